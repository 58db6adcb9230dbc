"""One split-size exchange per partitioned MoE layer instead of one per part.

Contract
--------
- Input: a forward graph made by ``partition_pass``. A group is the n per-part
  copies of one node (same ``origin``, parts 0..n-1) of the MoE dispatch stage:
  the fixed-size all-to-all of expert counts, or the device-to-host copy of the
  split sizes. A group is merged only when every part's copy depends on
  part-local values only through the dispatch stage itself and slices of whole
  values: the parts' routing was computed whole, as in a range of just the
  all-to-alls and experts. Where parts compute their own routing (a range
  reaching into attention) merging would hold part 0's split sizes back until
  the last part's routing exists, so such groups stay as they are.
- Counts: the n count vectors are stacked and laid out rank-major, so that one
  all-to-all hands each rank every part's counts in one block; each part reads
  its own counts back from the result. Split sizes: one copy of the stacked
  sizes to the host and one host wait; each part reads its row. The values
  every consumer sees are the same integers as before (exact).
- Order: the merged nodes are issued after the last part's inputs; every other
  node keeps its relative order except that consumers of a merged value follow
  it (a stable topological order). The host wait stays where the first part's
  wait was, or later if its copy is issued later.
- Returns the number of merged groups.

Pseudo-code
-----------
    for each group of count all-to-alls (or split-size copies) with whole routing:
        stacked = stack(part inputs); one collective (or copy + wait) on it
        part k's old result := its slice of the merged result
    re-order the graph stably and topologically
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch import fx

from lancet.graph.reorder import apply_order, stable_topological_order
from lancet.graph import meta
from lancet.passes.protocol import PassResult
from lancet.graph.roles import HOST_WAIT_OPS, TO_HOST_OPS, collective_kind, is_irregular_all_to_all, wait_of

aten = torch.ops.aten


def _is_count_exchange(node: fx.Node) -> bool:
    """A fixed-size all-to-all whose result reaches a split-size copy to the host within its own part.

    (Copies made by the partition pass carry no fake values, so the payload's dtype cannot tell; the
    token all-to-alls of a padded dispatch have constant splits too, but their rows reach no host copy.)
    """
    if collective_kind(node) != "all_to_all" or is_irregular_all_to_all(node):
        return False
    part = meta.part(node)
    stack, seen = [wait_of(node)], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            if user in seen or meta.part(user) != part or collective_kind(user) is not None:
                continue
            if _is_split_copy(user):
                return True
            seen.add(user)
            stack.append(user)
    return False


def _is_split_copy(node: fx.Node) -> bool:
    return node.target in TO_HOST_OPS


def _part_groups(graph: fx.Graph, member) -> list[list[fx.Node]]:
    """Complete groups (parts 0..n-1 of one origin) of dispatch-stage nodes for which ``member`` holds."""
    by_origin: dict[str, dict[int, fx.Node]] = defaultdict(dict)
    parts_of: dict[str, int] = {}
    for node in graph.nodes:
        custom = meta.custom(node)
        if node.op != "call_function" or custom.get(meta.PART) is None or not meta.is_dispatch(node):
            continue
        if member(node):
            by_origin[custom[meta.ORIGIN]][custom[meta.PART]] = node
            parts_of[custom[meta.ORIGIN]] = custom[meta.PARTS]
    return [
        [nodes[k] for k in range(parts_of[origin])]
        for origin, nodes in by_origin.items()
        if sorted(nodes) == list(range(parts_of[origin]))
    ]


def _is_part_slice(node: fx.Node) -> bool:
    return node.target is operator.getitem and getattr(node.args[0], "target", None) is aten.split.Tensor


def _routing_is_whole(node: fx.Node) -> bool:
    """Every part-local ancestor of ``node`` is a dispatch-stage node or a slice of a whole value."""
    part = meta.part(node)
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        producer = stack.pop()
        if producer in seen or meta.part(producer) != part:
            continue
        seen.add(producer)
        if _is_part_slice(producer):
            continue
        if not meta.is_dispatch(producer):
            return False
        stack.extend(producer.all_input_nodes)
    return True


def _new(graph: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta[meta.CUSTOM] = {**meta.custom(like), meta.PART: None}
    return node


def _merge_exchange(graph: fx.Graph, starts: list[fx.Node]) -> bool:
    """n count all-to-alls with splits [L] * W -> one all-to-all of the rank-major [W, n, L] counts."""
    first = starts[0]
    out_splits, in_splits, group_name = first.args[1], first.args[2], first.args[3]
    if not out_splits or list(out_splits) != list(in_splits) or len(set(out_splits)) != 1:
        return False  # not an even exchange with explicit splits; leave it
    world, parts, local = len(out_splits), len(starts), out_splits[0]
    waits = [wait_of(start) for start in starts]
    with graph.inserting_before(max(starts, key=_position(graph)).next):
        stacked = _new(graph, aten.stack.default, ([s.args[0] for s in starts], 0), first)
        grid = _new(graph, aten.view.default, (stacked, [parts, world, local]), first)
        rank_major = _new(graph, aten.permute.default, (grid, [1, 0, 2]), first)
        packed = _new(graph, aten.clone.default, (rank_major,), first)
        packed.kwargs = {"memory_format": torch.contiguous_format}
        flat = _new(graph, aten.view.default, (packed, [world * parts * local]), first)
        block = [parts * local] * world
        merged = _new(graph, first.target, (flat, block, block, group_name), first)
        waited = _new(graph, waits[0].target, (merged,), waits[0])
        received = _new(graph, aten.view.default, (waited, [world, parts, local]), first)
        for k, wait in enumerate(waits):
            mine = _new(graph, aten.select.int, (received, 1, k), first)
            own = _new(graph, aten.clone.default, (mine,), first)
            own.kwargs = {"memory_format": torch.contiguous_format}
            counts = _new(graph, aten.view.default, (own, [world * local]), first)
            wait.replace_all_uses_with(counts)
    for wait, start in zip(waits, starts):
        graph.erase_node(wait)
        graph.erase_node(start)
    return True


def _merge_split_copies(graph: fx.Graph, copies: list[fx.Node]) -> bool:
    """n copies of split sizes to the host (each awaited once) -> one copy of the stacked sizes, one wait."""
    waits = []
    for copy in copies:
        users = list(copy.users)
        if len(users) != 1 or users[0].target not in HOST_WAIT_OPS:
            return False
        waits.append(users[0])
    with graph.inserting_before(max(copies, key=_position(graph)).next):
        stacked = _new(graph, aten.stack.default, ([c.args[0] for c in copies], 0), copies[0])
        merged_copy = _new(graph, copies[0].target, (stacked,), copies[0])
    with graph.inserting_before(min(waits, key=_position(graph))):
        merged_wait = _new(graph, waits[0].target, (merged_copy,), waits[0])
    for k, wait in enumerate(waits):
        with graph.inserting_before(wait):
            row = _new(graph, aten.select.int, (merged_wait, 0, k), wait)
        wait.replace_all_uses_with(row)
    for wait, copy in zip(waits, copies):
        graph.erase_node(wait)
        graph.erase_node(copy)
    return True


def _position(graph: fx.Graph):
    index = {node: i for i, node in enumerate(graph.nodes)}
    return index.__getitem__


def merge_count_exchanges(graph: fx.Graph) -> int:
    """Merge the per-part count all-to-alls and split-size copies of whole-routing MoE layers (see contract)."""
    merged = 0
    for starts in _part_groups(graph, _is_count_exchange):
        if all(_routing_is_whole(s) for s in starts) and _merge_exchange(graph, starts):
            merged += 1
    for copies in _part_groups(graph, _is_split_copy):
        if all(_routing_is_whole(c) for c in copies) and _merge_split_copies(graph, copies):
            merged += 1
    if merged:
        apply_order(graph, stable_topological_order(graph))
    return merged


def merge_counts_pass(forward, costs=None) -> PassResult:
    """``merge_count_exchanges`` as a listed pass: in place on ``forward.gm.graph``; decisions: groups merged."""
    return PassResult(forward, merge_count_exchanges(forward.gm.graph))
