"""The step as a program of phases and regions: what the compiled and CUDA-graph executors run.

``build_program`` turns a captured (and possibly rewritten) step graph into a
two-level ``fx.GraphModule``:

- the top module calls one submodule per phase (``forward``, ``backward``;
  ``torch.fx.passes.split_module`` cuts the graph at its first backward node),
  so each phase can be timed, marked in a profile and captured as its own CUDA
  graph;
- inside a phase, every compute region that ``lancet.graph.regions`` marks for
  compilation is one call (``torch.fx.passes.utils.fuser_utils.fuse_by_partitions``
  moves its nodes into a submodule); collectives, their waits, host copies and
  host waits, and the regions that are not compiled stay as they were, in the
  order the plan gave them.

Contract: the program computes what the graph computes; the boundary nodes keep
their relative order and each collective's window holds exactly the compute
nodes it held in the graph (regions never hold a boundary, and a region is a run
of consecutive nodes, so it sits where its nodes were). The source graph is not
changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from lancet.capture.trace import TrainGraph
from lancet.graph.regions import MIN_KERNELS, Region, cut_regions, node_phase
from lancet.step.train_step import PHASE_ANNOTATION

REGION_PREFIX = "region_"


REGION_ANNOTATION = "lancet/region/{index}"
"""``torch.profiler.record_function`` name of each compiled region's call."""


class RegionCall(nn.Module):
    """One compiled region as called from its phase; ``impl`` runs it (the traced module until compiled).

    Each call is a profiler range (``lancet/region/<index>``): traces show which region launched
    which kernels, and ``lancet.runtime.record`` reads the order regions ran in.
    """

    def __init__(self, region: Region, module: fx.GraphModule) -> None:
        super().__init__()
        self.region = region
        self.module = module
        self.impl = module.forward
        self.annotation = REGION_ANNOTATION.format(index=region.index)

    def forward(self, *args):
        with torch.profiler.record_function(self.annotation):
            return self.impl(*args)


class PhaseCall(nn.Module):
    """One phase as called from the top module: a profiler range around ``impl`` (the phase module by default)."""

    def __init__(self, phase: str, module: fx.GraphModule) -> None:
        super().__init__()
        self.phase = phase
        self.module = module
        self.impl = module.forward
        self.annotation = PHASE_ANNOTATION.format(phase=phase)

    def forward(self, *args):
        with torch.profiler.record_function(self.annotation):
            return self.impl(*args)


@dataclass(slots=True)
class StepProgram:
    """A step graph as phases of regions; ``top`` takes the graph's inputs and returns its outputs."""

    top: fx.GraphModule
    regions: list[Region]
    """Every region of the source graph (compiled or not), in graph order."""
    calls: dict[int, RegionCall] = field(default_factory=dict)
    """Region index -> its call, for the regions that are compiled."""
    phases: list[PhaseCall] = field(default_factory=list)

    def __call__(self, *inputs):
        return self.top(*inputs)


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new module over a copy of ``gm``'s graph (node meta shared shallowly) and the node map."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    return fx.GraphModule(gm, graph), env


def _fuse_regions(gm: fx.GraphModule, regions: list[Region], env: dict[fx.Node, fx.Node]) -> dict[int, RegionCall]:
    """Move each region into a submodule called where its nodes were; returns the calls by region index."""
    fused = [r for r in regions if r.compiled]
    partitions = [dict.fromkeys(env[n] for n in r.nodes) for r in fused]
    fuse_by_partitions(gm, partitions, prefix=REGION_PREFIX, always_return_tuple=True)
    calls: dict[int, RegionCall] = {}
    by_name = {f"{REGION_PREFIX}{i}": r for i, r in enumerate(fused)}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in by_name:
            region = by_name[node.target]
            node.meta.setdefault("custom", {})["phase"] = region.phase
            call = RegionCall(region, getattr(gm, node.target))
            setattr(gm, node.target, call)
            calls[region.index] = call
    return calls


def _phase_split(gm: fx.GraphModule, first_backward: fx.Node | None) -> tuple[fx.GraphModule, list[PhaseCall]]:
    """Cut ``gm`` before ``first_backward`` into a forward and a backward submodule (one ``step`` if None)."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    cut = position[first_backward] if first_backward is not None else len(position)
    names = ("forward", "backward") if first_backward is not None else ("step",)
    top = split_module(gm, gm, lambda node: 0 if position[node] < cut else 1, keep_original_order=True,
                       keep_original_node_name=True)
    phases = []
    for node in top.graph.nodes:
        if node.op == "call_module":
            index = int(str(node.target).removeprefix("submod_"))
            call = PhaseCall(names[index], getattr(top, node.target))
            setattr(top, node.target, call)
            phases.append(call)
    return top, phases


def _first_backward(graph: fx.Graph) -> fx.Node | None:
    """The first backward node (None: no backward); the backward phase runs from it to the end."""
    return next((n for n in graph.nodes if n.op == "call_function" and node_phase(n) == "backward"), None)


def build_program(train_graph: TrainGraph, *, fuse: bool = True, min_kernels: int = MIN_KERNELS) -> StepProgram:
    """The program of ``train_graph``: phases, and (with ``fuse``) its compiled regions as calls.

    The regions' calls run their traced modules until an executor sets their
    ``impl`` to a compiled function.
    """
    regions = cut_regions(train_graph.graph, min_kernels)
    gm, env = _copy(train_graph.gm)
    first = _first_backward(train_graph.graph)
    calls = _fuse_regions(gm, regions, env) if fuse else {}
    cut_node = None
    if first is not None:  # fusing re-creates the graph's nodes: find the cut by name, or as its region's call
        region = next((r for r in regions if first in r.nodes), None)
        call = calls.get(region.index) if region is not None else None
        cut_node = next(n for n in gm.graph.nodes if n.name == first.name or (
            call is not None and n.op == "call_module" and getattr(gm, n.target) is call))
    top, phases = _phase_split(gm, cut_node)
    return StepProgram(top=top, regions=regions, calls=calls, phases=phases)


def program_order(program: StepProgram) -> list[str]:
    """Names of the source graph's nodes in the order the program runs them (a region: its nodes in order).

    Equal to the source graph's order of call_function nodes: compiling changes what runs inside a
    region, never where a region, a collective or a wait runs.
    """
    names: list[str] = []
    for phase in program.phases:
        module = phase.module
        for node in module.graph.nodes:
            target = getattr(module, node.target) if node.op == "call_module" else None
            if isinstance(target, RegionCall):
                names.extend(target.region.names)
            elif node.op == "call_function" and not _is_region_output(module, node):
                names.append(node.name)
    return names


def _is_region_output(module: fx.GraphModule, node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    return (isinstance(source, fx.Node) and source.op == "call_module"
            and isinstance(getattr(module, source.target), RegionCall))
