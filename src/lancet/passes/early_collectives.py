"""Backward all-to-alls issued as soon as their inputs exist, awaited only when needed.

Contract
--------
- Order-only: the same nodes, every dependency kept, so results are bitwise
  equal. All-to-alls may change their relative order (issued as their inputs
  become ready); every rank rewrites the same graph the same way, so every
  rank still issues them in one order.
- Touches only the starts and waits of backward all-to-alls. Each start moves
  up to just after its last input; then each wait moves down to just before
  its first user.
- Why: autograd emits each all-to-all's wait right after its start. In the
  step captured from a partitioned forward, part k's backward all-to-all then
  blocks part k+1's backward compute; issued early and awaited late, one
  part's all-to-all overlaps another part's expert and dX compute, as the
  forward pipeline does.

Pseudo-code
-----------
    for s in backward all-to-all starts, in order:
        move s after its last input
    for w in their waits:
        move w before min(position(users of w))
"""

from __future__ import annotations

from torch import fx

from lancet.graph import meta
from lancet.passes.protocol import PassResult
from lancet.graph.reorder import apply_order
from lancet.graph.roles import Role, collective_kind, node_role, wait_of


def _is_backward(node: fx.Node) -> bool:
    return meta.get(node, meta.PHASE) == meta.BACKWARD


def early_collectives(graph: fx.Graph) -> int:
    """Reorder ``graph`` in place as the contract says; returns how many starts and waits changed place."""
    order = list(graph.nodes)
    before = {n: (order[i - 1] if i else None) for i, n in enumerate(order)}
    starts = [n for n in order if node_role(n) == Role.COMM_START and collective_kind(n) == "all_to_all"
              and _is_backward(n)]
    for start in starts:
        position = {n: i for i, n in enumerate(order)}
        target = max((position[a] for a in start.all_input_nodes), default=-1) + 1
        if target < position[start]:
            order.remove(start)
            order.insert(target, start)
    for start in starts:
        wait = wait_of(start)
        if not wait.users:
            continue
        order.remove(wait)
        position = {n: i for i, n in enumerate(order)}
        order.insert(min(position[u] for u in wait.users), wait)
    apply_order(graph, order)
    after = {n: (order[i - 1] if i else None) for i, n in enumerate(order)}
    return sum(1 for s in starts for n in (s, wait_of(s)) if before[n] is not after[n])


def early_collectives_pass(train_graph, costs=None) -> PassResult:
    """``early_collectives`` as a listed pass: in place, order-only; decisions: starts and waits moved."""
    return PassResult(train_graph, early_collectives(train_graph.gm.graph))
