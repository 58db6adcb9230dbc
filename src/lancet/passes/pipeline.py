"""Pipeline order for the parts of a partitioned region.

Contract
--------
- Order-only over the given nodes (a topologically valid order of them is
  returned); nodes carry ``meta["custom"]["part"]`` (None for whole nodes).
- Stage-major interleaving: a node's stage counts the waits on its way from
  the region's inputs that separate pipeline stages: host waits for split
  sizes and waits of token-carrying all-to-alls, padded or ragged
  (``carries_tokens``: a predicate on the all-to-all's start node, by default
  ``lancet.graph.roles.carries_tokens``; the partition pass answers it for
  its copies from the node each was copied from). The wait of the
  small fixed-size counts exchange is not a stage boundary, so a part's split
  sizes start their copy to the host before the next part's compute is
  issued. Nodes are issued by (stage, part, original position): part k's
  all-to-all is issued before part k+1's compute of the same stage, and the
  host waits for part k's split sizes only after every part's earlier-stage
  work has been issued, so the device keeps working while the host waits.

- As a listed pass (``pipeline_order_pass``): every partitioned region of a
  forward graph (its nodes carry ``lancet.graph.meta.REGION``; the partition
  rewrite emits them contiguously) is re-ordered in place; an all-to-all copy
  carries tokens when its ``TOKEN_ROWS`` mark says so.

Pseudo-code
-----------
    stage(n) = max(stage(inputs)) + (1 if n is a host wait or the wait of a token all-to-all else 0)
    list-schedule the nodes, always taking the ready node with the smallest (stage, part, position)

    compute |p0 attn+gate|p1 attn+gate|p0 experts|p1 experts|...
    comm                  |p0 dispatch|p1 dispatch|p0 combine|p1 combine
"""

from __future__ import annotations

import heapq

from torch import fx

from collections.abc import Callable

from lancet.graph import meta
from lancet.graph.roles import Role, carries_tokens as _carries_tokens, collective_kind, node_role
from lancet.passes.protocol import PassResult


def _is_stage_boundary(node: fx.Node, carries_tokens: Callable[[fx.Node], bool]) -> bool:
    role = node_role(node)
    if role == Role.HOST_WAIT:
        return True
    return role == Role.COMM_WAIT and any(
        collective_kind(p) == "all_to_all" and carries_tokens(p) for p in node.all_input_nodes
    )


def _stages(nodes: list[fx.Node], carries_tokens: Callable[[fx.Node], bool]) -> dict[fx.Node, int]:
    members = set(nodes)
    stage: dict[fx.Node, int] = {}
    for node in nodes:
        base = max((stage[p] for p in node.all_input_nodes if p in members), default=0)
        stage[node] = base + (1 if _is_stage_boundary(node, carries_tokens) else 0)
    return stage


def _marked_carries_tokens(start: fx.Node) -> bool:
    marked = meta.get(start, meta.TOKEN_ROWS)
    return _carries_tokens(start) if marked is None else marked


def pipeline_order_pass(graph_holder, costs=None) -> PassResult:
    """Order every partitioned region of ``graph_holder.gm.graph`` stage-major (in place, order-only).

    Decisions out: the number of regions re-ordered.
    """
    graph = graph_holder.gm.graph
    regions: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        index = meta.get(node, meta.REGION)
        if index is not None:
            regions.setdefault(index, []).append(node)
    for nodes in regions.values():
        after_region = nodes[-1].next
        for node in pipeline_order(nodes, _marked_carries_tokens):
            after_region.prepend(node)
    return PassResult(graph_holder, len(regions))


def pipeline_order(
    nodes: list[fx.Node], carries_tokens: Callable[[fx.Node], bool] = _carries_tokens
) -> list[fx.Node]:
    """``nodes`` (given in a valid order) re-ordered stage-major, part by part."""
    members = set(nodes)
    position = {n: i for i, n in enumerate(nodes)}
    stage = _stages(nodes, carries_tokens)

    def key(node: fx.Node) -> tuple[int, int, int]:
        part = meta.part(node)
        return (stage[node], -1 if part is None else part, position[node])

    waiting = {n: sum(1 for p in set(n.all_input_nodes) if p in members) for n in nodes}
    ready = [key(n) + (n.name,) for n in nodes if waiting[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    order: list[fx.Node] = []
    while ready:
        node = by_name[heapq.heappop(ready)[-1]]
        order.append(node)
        for user in node.users:
            if user in members:
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, key(user) + (user.name,))
    if len(order) != len(nodes):
        raise ValueError("pipeline order: the nodes do not form a DAG")
    return order
