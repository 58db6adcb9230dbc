"""Compute regions of a step graph: the runs of compute between communication points.

The compiled executor hands each region to a compiler as one unit, so a region
must never hold a node whose position the plan fixes relative to a collective.
A *boundary* is a collective start, a collective wait, a host sync, a host wait,
or the asynchronous split-size copy (``lancet::to_host``). A *region* is a
maximal run of consecutive compute nodes (graph order) with no boundary between
them, one phase (forward or backward) and one unit (``meta.separate_region``:
each chunk of the chunked loss is one), so no region straddles a collective
window edge, the phase boundary or a unit's edge.

Regions are of three kinds:

- ``static``: every value it reads or makes has static sizes, and at least
  ``min_kernels`` of its nodes launch work: compiled;
- ``dynamic``: some value has a data-dependent size (rows behind a ragged
  all-to-all: unbacked symbols in the node's fake value): run as traced;
- ``small``: static, but fewer nodes launch work than are worth a compiled
  call (views, ``getitem`` and size arithmetic launch none): run as traced.

Within a run between boundaries, static stretches of at least ``min_kernels``
kernels become their own compiled regions; the rest of the run (data-dependent
nodes and short static stretches between them) is run as traced.

Contract: pure; the graph is not changed. Cutting a graph twice gives the same
regions; every compute node is in exactly one region; the regions and the
boundaries, in graph order, are the graph's compute and boundary nodes in graph
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from lancet.graph import meta
from lancet.graph.roles import TO_HOST_OPS, Role, is_view, node_role

STATIC, DYNAMIC, SMALL = "static", "dynamic", "small"
MIN_KERNELS = 2
"""A static run with fewer nodes that launch work is not worth a compiled call (it fuses nothing)."""
BOUNDARY_ROLES = (Role.COMM_START, Role.COMM_WAIT, Role.HOST_SYNC, Role.HOST_WAIT)


def is_boundary(node: fx.Node) -> bool:
    """Nodes whose place the plan fixes: collectives, their waits, host syncs and waits, host copies."""
    return node_role(node) in BOUNDARY_ROLES or node.target in TO_HOST_OPS


def node_phase(node: fx.Node) -> str:
    """The trace-time phase annotation; unannotated nodes count as backward (as in ``graph.analysis``)."""
    return meta.phase(node)


def _has_symbols(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        if _concrete_layout(value):  # what free_symbols would look at, all plain ints: no symbol (and far faster)
            return False
        return bool(free_symbols(value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return bool(free_symbols(value))
    if isinstance(value, (list, tuple)):
        return any(_has_symbols(v) for v in value)
    return False


def _concrete_layout(tensor: torch.Tensor) -> bool:
    """A strided tensor whose sizes, strides and storage offset are all plain ints."""
    if tensor.layout != torch.strided:
        return False
    return (all(type(d) is int for d in tensor.shape) and all(type(d) is int for d in tensor.stride())
            and type(tensor.storage_offset()) is int)


def _val_has_symbols(node: fx.Node, memo: dict[fx.Node, bool] | None) -> bool:
    if memo is None:
        return _has_symbols(node.meta.get("val"))
    if node not in memo:
        memo[node] = _has_symbols(node.meta.get("val"))
    return memo[node]


def is_dynamic(node: fx.Node, memo: dict[fx.Node, bool] | None = None) -> bool:
    """Whether the node makes or reads a value whose size (or value, for a size) is data-dependent.

    ``memo``: per-node answers of earlier calls on the same graph (a graph's sizes do not change while it
    is being cut into regions), so that each value is examined once.
    """
    if _val_has_symbols(node, memo):
        return True
    return any(_val_has_symbols(arg, memo) for arg in node.all_input_nodes)


@dataclass(slots=True, eq=False)
class Region:
    """A run of compute nodes between communication points, in graph order."""

    index: int
    phase: str
    kind: str
    """``static`` (compiled), ``dynamic`` or ``small`` (run as traced)."""
    nodes: list[fx.Node] = field(default_factory=list)

    @property
    def compiled(self) -> bool:
        return self.kind == STATIC

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def num_kernels(self) -> int:
        """Nodes that launch work (not views or size arithmetic)."""
        return _kernels(self.nodes)


def _kernels(nodes: list[fx.Node]) -> int:
    return sum(1 for n in nodes if not is_view(n))


def _runs(graph: fx.Graph) -> list[list[fx.Node]]:
    """Maximal runs of compute nodes with no boundary between them, one phase and one unit."""
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in graph.nodes:
        if node.op != "call_function" or is_boundary(node):
            if current:
                runs.append(current)
            current = []
            continue
        if current and (node_phase(node), meta.unit(node)) != (node_phase(current[-1]), meta.unit(current[-1])):
            runs.append(current)
            current = []
        current.append(node)
    if current:
        runs.append(current)
    return runs


def _split_run(run: list[fx.Node], min_kernels: int, memo: dict[fx.Node, bool]) -> list[tuple[str, list[fx.Node]]]:
    """(kind, nodes) pieces of one run: compiled static stretches, and what lies between them."""
    stretches: list[tuple[bool, list[fx.Node]]] = []
    for node in run:
        dynamic = is_dynamic(node, memo)
        if stretches and dynamic == stretches[-1][0]:
            stretches[-1][1].append(node)
        else:
            stretches.append((dynamic, [node]))
    pieces: list[tuple[str, list[fx.Node]]] = []
    for dynamic, stretch in stretches:
        compiled = not dynamic and _kernels(stretch) >= min_kernels
        kind = STATIC if compiled else (DYNAMIC if dynamic else SMALL)
        if pieces and kind != STATIC and pieces[-1][0] != STATIC:
            merged = DYNAMIC if DYNAMIC in (kind, pieces[-1][0]) else SMALL
            pieces[-1] = (merged, pieces[-1][1] + stretch)
        else:
            pieces.append((kind, list(stretch)))
    return pieces


def cut_regions(graph: fx.Graph, min_kernels: int = MIN_KERNELS) -> list[Region]:
    """The graph's regions in graph order (see the module docstring)."""
    regions: list[Region] = []
    memo: dict[fx.Node, bool] = {}
    for run in _runs(graph):
        for kind, nodes in _split_run(run, min_kernels, memo):
            regions.append(Region(len(regions), node_phase(nodes[0]), kind, nodes))
    return regions


def first_backward_node(graph: fx.Graph) -> fx.Node | None:
    """Where the backward phase begins: its first node (None: no backward). Executors cut phases here."""
    return next((n for n in graph.nodes if n.op == "call_function" and node_phase(n) == "backward"), None)


def region_of(regions: list[Region]) -> dict[str, int]:
    """Node name -> index of the region that holds it."""
    return {node.name: region.index for region in regions for node in region.nodes}
