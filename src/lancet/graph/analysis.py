"""Facts about a captured step graph that every pass and report needs.

- phase: *forward* or *backward*, as annotated while tracing (the
  data-parallel all-reduce is backward);
- collectives: each start/wait pair with its kind, phase and purpose;
- MoE layers: the counts exchange, dispatch and combine all-to-alls of each
  layer (forward and backward), found through the split-size values they share;
- the dW set: backward compute nodes with no ordering relative to at least one
  backward all-to-all (so they may run inside its window), each with the list
  of all-to-alls it may overlap, in graph order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from lancet.capture.trace import TrainGraph
from lancet.graph.deps import Reachability
from lancet.graph.roles import (
    Role,
    collective_kind,
    is_irregular_all_to_all,
    node_role,
    wait_of,
)

FORWARD, BACKWARD = "forward", "backward"


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
    """The host-read split sizes shared by this layer's four data all-to-alls."""


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
    return node.meta.get("custom", {}).get("phase", BACKWARD)


def _split_key(start: fx.Node) -> frozenset[fx.Node]:
    splits = list(start.args[1] or []) + list(start.args[2] or [])
    return frozenset(s for s in splits if isinstance(s, fx.Node))


def _collectives(graph: fx.Graph, phase: dict[fx.Node, str]) -> list[Collective]:
    found = []
    for node in graph.nodes:
        kind = collective_kind(node)
        if kind is None:
            continue
        purpose = "other"
        if kind == "all_reduce" and phase[node] == BACKWARD:
            purpose = "grad_allreduce"
        elif kind == "all_to_all" and not is_irregular_all_to_all(node):
            purpose = "counts"
        found.append(Collective(start=node, wait=wait_of(node), kind=kind, phase=phase[node], purpose=purpose))
    return found


def _moe_layers(collectives: list[Collective], reach: Reachability) -> list[MoELayerInfo]:
    by_key: dict[frozenset, list[Collective]] = {}
    for c in collectives:
        if c.kind == "all_to_all" and is_irregular_all_to_all(c.start):
            by_key.setdefault(_split_key(c.start), []).append(c)
    counts = [c for c in collectives if c.purpose == "counts"]
    layers = []
    for key, group in by_key.items():
        forward = [c for c in group if c.phase == FORWARD]
        backward = [c for c in group if c.phase == BACKWARD]
        if len(forward) != 2 or len(backward) > 2:
            continue
        dispatch, combine = forward
        combine_grad, dispatch_grad = (backward + [None, None])[:2]
        roles = ((dispatch, "dispatch"), (combine, "combine"), (combine_grad, "combine_grad"), (dispatch_grad, "dispatch_grad"))
        for c, purpose in roles:
            if c is not None:
                c.purpose = purpose
        feeding = [c for c in counts if any(reach.is_ancestor(c.wait, s) for s in key)]
        module = dispatch.start.meta.get("custom", {}).get("module", "")
        layers.append(
            MoELayerInfo(
                index=0,
                module=module,
                counts=feeding[-1] if feeding else None,
                dispatch=dispatch,
                combine=combine,
                combine_grad=combine_grad,
                dispatch_grad=dispatch_grad,
                split_nodes=sorted(key, key=lambda n: reach.index[n]),
            )
        )
    layers.sort(key=lambda layer: reach.index[layer.dispatch.start])
    for i, layer in enumerate(layers):
        layer.index = i
        for c in (layer.counts, layer.dispatch, layer.combine, layer.combine_grad, layer.dispatch_grad):
            if c is not None:
                c.layer = i
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


def analyze(train_graph: TrainGraph) -> GraphAnalysis:
    graph = train_graph.graph
    reach = Reachability(graph)
    roles = {n: node_role(n) for n in graph.nodes}
    phase = {n: node_phase(n) for n in graph.nodes}
    collectives = _collectives(graph, phase)
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

