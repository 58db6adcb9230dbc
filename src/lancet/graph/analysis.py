"""Facts about a captured step graph that every pass and report needs.

- phase: *forward* or *backward*, as annotated while tracing (the
  data-parallel all-reduce is backward);
- collectives: each start/wait pair with its kind, phase and purpose;
- MoE layers: the dispatch and combine all-to-alls of each layer, forward and
  backward, and (ragged dispatch) its counts exchange, found from collectives
  and data flow alone, so padded (constant splits) and ragged (data-dependent
  splits) layers are found alike:
    * a token all-to-all carries floating-point rows; a counts exchange is a
      fixed-size all-to-all of integers whose result reaches split sizes or a
      host read;
    * a dispatch is a token all-to-all whose result flows, through compute only
      (no other collective in between), into a later token all-to-all of the
      same phase: the combine; in the backward the same rule pairs the
      combine's gradient with the dispatch's;
    * a backward pair belongs to the forward pair whose split sizes it shares
      (ragged); otherwise pairs match in mirror order (the backward runs the
      layers in reverse: each layer's backward reads the gradient the later
      layer's backward produced);
- the dW set: backward compute nodes with no ordering relative to at least one
  backward all-to-all (so they may run inside its window), each with the list
  of all-to-alls it may overlap, in graph order;
- dispatch stages (``dispatch_stages``): per forward MoE layer, the nodes of
  its row-local dispatch stage: those marked with ``lancet.graph.meta.dispatch_region``
  (grouped into layers by data flow), or, for a layer with no marked node, the
  nodes on a path from its dispatch all-to-all to its combine all-to-all.

This is the one MoE-layer detector: passes, plans and reports ask it, never
module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from lancet.graph import meta
from lancet.graph.deps import Reachability
from lancet.graph.roles import Role, carries_tokens, collective_kind, node_role, wait_of

FORWARD, BACKWARD = meta.FORWARD, meta.BACKWARD


@dataclass(slots=True, eq=False)
class Collective:
    start: fx.Node
    wait: fx.Node
    kind: str
    phase: str
    purpose: str
    """counts | dispatch | combine | dispatch_grad | combine_grad | grad_allreduce | other"""
    layer: int | None = None
    """MoE layer index (in forward order) for MoE all-to-alls."""


@dataclass(slots=True)
class MoELayerInfo:
    index: int
    module: str
    counts: Collective | None
    dispatch: Collective
    combine: Collective
    combine_grad: Collective | None
    dispatch_grad: Collective | None
    split_nodes: list[fx.Node]
    """The host-read split sizes shared by this layer's four data all-to-alls (empty: padded dispatch)."""


@dataclass(slots=True)
class GraphAnalysis:
    graph: fx.Graph
    reach: Reachability
    roles: dict[fx.Node, Role]
    phase: dict[fx.Node, str]
    collectives: list[Collective]
    moe_layers: list[MoELayerInfo]
    host_syncs: list[fx.Node]
    dw_overlap: dict[fx.Node, list[Collective]] = field(default_factory=dict)
    """dW node -> the backward all-to-alls it may overlap (graph order)."""

    @property
    def dw_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n in self.dw_overlap]

    def collectives_of(self, kind: str, phase: str | None = None) -> list[Collective]:
        return [c for c in self.collectives if c.kind == kind and (phase is None or c.phase == phase)]


def node_phase(node: fx.Node) -> str:
    """forward/backward from the trace-time annotation; unannotated nodes (none in a TrainStep trace) are backward."""
    if node.op in ("placeholder", "output"):
        return node.op
    return meta.phase(node)


def _split_key(start: fx.Node) -> frozenset[fx.Node]:
    splits = list(start.args[1] or []) + list(start.args[2] or [])
    return frozenset(s for s in splits if isinstance(s, fx.Node))


def _split_and_host_reads(graph: fx.Graph, roles: dict[fx.Node, Role]) -> list[fx.Node]:
    """Nodes through which device values reach the host or become split sizes."""
    found = [n for n in graph.nodes if roles[n] in (Role.HOST_SYNC, Role.HOST_WAIT)]
    for node in graph.nodes:
        if collective_kind(node) == "all_to_all":
            found.extend(_split_key(node))
    return found


def _collectives(graph: fx.Graph, phase: dict[fx.Node, str], roles: dict, reach: Reachability) -> list[Collective]:
    host_reads = _split_and_host_reads(graph, roles)
    found = []
    for node in graph.nodes:
        kind = collective_kind(node)
        if kind is None:
            continue
        wait = wait_of(node)
        purpose = "other"
        if kind == "all_reduce" and phase[node] == BACKWARD:
            purpose = "grad_allreduce"
        elif kind == "all_to_all" and not carries_tokens(node):
            if any(reach.is_ancestor(wait, read) for read in host_reads):
                purpose = "counts"
        found.append(Collective(start=node, wait=wait, kind=kind, phase=phase[node], purpose=purpose))
    return found


def _through_another(first: Collective, second: Collective, collectives: list[Collective], reach: Reachability) -> bool:
    """Whether ``second`` reads ``first``'s result only by way of another collective."""
    return any(
        c is not first and c is not second and reach.is_ancestor(first.wait, c.start)
        and reach.is_ancestor(c.wait, second.start)
        for c in collectives
    )


def _pairs(collectives: list[Collective], phase: str, reach: Reachability) -> list[tuple[Collective, Collective]]:
    """Token all-to-alls of ``phase`` paired with the first later one that reads their result through compute only."""
    tokens = [c for c in collectives if c.phase == phase and c.kind == "all_to_all" and carries_tokens(c.start)]
    taken: set[int] = set()
    pairs = []
    for i, first in enumerate(tokens):
        if id(first) in taken:
            continue
        for second in tokens[i + 1 :]:
            if id(second) in taken or not reach.is_ancestor(first.wait, second.start):
                continue
            if not _through_another(first, second, collectives, reach):
                pairs.append((first, second))
                taken |= {id(first), id(second)}
            break
    return pairs


def _match_backward(
    forward: list[tuple[Collective, Collective]], backward: list[tuple[Collective, Collective]]
) -> dict[int, tuple[Collective, Collective]]:
    """Forward pair index -> its backward pair: by shared split sizes, else in mirror order."""
    matched: dict[int, tuple[Collective, Collective]] = {}
    by_key = {_split_key(d.start): i for i, (d, _) in enumerate(forward) if _split_key(d.start)}
    rest = []
    for pair in backward:
        i = by_key.get(_split_key(pair[0].start))
        if i is not None and i not in matched:
            matched[i] = pair
        else:
            rest.append(pair)
    unmatched = [i for i in range(len(forward)) if i not in matched]
    for i, pair in zip(reversed(unmatched), rest):
        matched[i] = pair
    return matched


def _moe_layers(collectives: list[Collective], reach: Reachability) -> list[MoELayerInfo]:
    forward = _pairs(collectives, FORWARD, reach)
    backward = _match_backward(forward, _pairs(collectives, BACKWARD, reach))
    counts = [c for c in collectives if c.purpose == "counts"]
    layers = []
    for i, (dispatch, combine) in enumerate(forward):
        combine_grad, dispatch_grad = backward.get(i, (None, None))
        roles = {"dispatch": dispatch, "combine": combine, "combine_grad": combine_grad, "dispatch_grad": dispatch_grad}
        for purpose, c in roles.items():
            if c is not None:
                c.purpose = purpose
        key = _split_key(dispatch.start)
        feeding = [c for c in counts if any(reach.is_ancestor(c.wait, s) for s in key)]
        layers.append(
            MoELayerInfo(
                index=i,
                module=meta.module(dispatch.start),
                counts=feeding[-1] if feeding else None,
                dispatch=dispatch,
                combine=combine,
                combine_grad=combine_grad,
                dispatch_grad=dispatch_grad,
                split_nodes=sorted(key, key=lambda n: reach.index[n]),
            )
        )
    for layer in layers:
        for c in (layer.counts, layer.dispatch, layer.combine, layer.combine_grad, layer.dispatch_grad):
            if c is not None:
                c.layer = layer.index
    return layers


def _dw_overlap(
    graph: fx.Graph, reach: Reachability, roles: dict, phase: dict, collectives: list[Collective]
) -> dict[fx.Node, list[Collective]]:
    backward_a2a = [c for c in collectives if c.kind == "all_to_all" and c.phase == BACKWARD]
    after_allreduce = 0
    for c in collectives:
        if c.purpose == "grad_allreduce":
            after_allreduce |= reach.descendants_mask(c.wait)
    overlap: dict[fx.Node, list[Collective]] = {}
    for node in graph.nodes:
        if roles[node] != Role.COMPUTE or phase[node] != BACKWARD or reach.in_mask(node, after_allreduce):
            continue
        windows = [
            c for c in backward_a2a if not reach.is_ancestor(node, c.start) and not reach.is_ancestor(c.wait, node)
        ]
        if windows:
            overlap[node] = windows
    return overlap


def analyze(graph_or_step) -> GraphAnalysis:
    """Facts of an ``fx.Graph`` (or of anything holding one as ``.graph``: a captured step or forward)."""
    graph = graph_or_step if isinstance(graph_or_step, fx.Graph) else graph_or_step.graph
    reach = Reachability(graph)
    roles = {n: node_role(n) for n in graph.nodes}
    phase = {n: node_phase(n) for n in graph.nodes}
    collectives = _collectives(graph, phase, roles, reach)
    layers = _moe_layers(collectives, reach)
    analysis = GraphAnalysis(
        graph=graph,
        reach=reach,
        roles=roles,
        phase=phase,
        collectives=collectives,
        moe_layers=layers,
        host_syncs=[n for n in graph.nodes if roles[n] in (Role.HOST_SYNC, Role.HOST_WAIT)],
    )
    analysis.dw_overlap = _dw_overlap(graph, reach, roles, phase, collectives)
    return analysis



def _components(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """Connected components of the data-flow graph restricted to ``nodes`` (each in graph order)."""
    members = set(nodes)
    parent = {n: n for n in nodes}

    def root(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in nodes:
        for producer in node.all_input_nodes:
            if producer in members:
                parent[root(producer)] = root(node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        groups.setdefault(root(node), []).append(node)
    return list(groups.values())


def _between(start: fx.Node, end: fx.Node, reach: Reachability) -> list[fx.Node]:
    """Nodes on a path from ``start`` to ``end`` (both included), in graph order."""
    return [n for n in reach.nodes if n in (start, end) or (reach.is_ancestor(start, n) and reach.is_ancestor(n, end))]


def _marked_stages(graph: fx.Graph, anchors: list[fx.Node]) -> list[list[fx.Node]]:
    """Marked dispatch nodes grouped into layers: a component holding a forward token all-to-all is a layer
    (without any, every component is); other components join the layer they follow (or the first)."""
    marked = [n for n in graph.nodes if n.op == "call_function" and meta.is_dispatch(n)]
    components = _components(marked)
    anchor_set = set(anchors)
    layers = [c for c in components if anchor_set & set(c)] or components
    if not layers:
        return []
    position = {n: i for i, n in enumerate(graph.nodes)}
    layers.sort(key=lambda c: position[c[0]])
    firsts = [position[c[0]] for c in layers]
    for component in components:
        if any(component is layer for layer in layers):
            continue
        at = max((i for i, first in enumerate(firsts) if first <= position[component[0]]), default=0)
        layers[at] = sorted(layers[at] + component, key=position.__getitem__)
    return layers


def dispatch_stages(graph: fx.Graph, analysis: GraphAnalysis | None = None) -> list[list[fx.Node]]:
    """The dispatch stage of every forward MoE layer, in forward order (see the module docstring).

    Marked stages come first from the marks; a layer found from its all-to-alls that holds no marked node
    gets the nodes between its dispatch start and its combine wait.
    """
    analysis = analysis if analysis is not None else analyze(graph)
    anchors = [layer.dispatch.start for layer in analysis.moe_layers]
    stages = _marked_stages(graph, anchors)
    covered = {n for stage in stages for n in stage}
    for layer in analysis.moe_layers:
        if layer.dispatch.start not in covered:
            stages.append(_between(layer.dispatch.start, layer.combine.wait, analysis.reach))
    position = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(stages, key=lambda stage: position[stage[0]])
