"""The step as a program of phases and regions: what the compiled and CUDA-graph executors run.

``build_program`` turns a captured (and possibly rewritten) step graph into a
two-level ``fx.GraphModule``:

- the top module calls one submodule per phase (``forward``, ``backward``;
  ``torch.fx.passes.split_module`` cuts the graph at its first backward node),
  so each phase can be timed, marked in a profile and captured as its own CUDA
  graph. ``StepProgram`` runs the top module's few nodes itself and hands each
  phase its arguments in a list that the phase empties (``ListArgsCodeGen``):
  the phase then holds the only reference to each argument and frees it at its
  last use, so the forward's activations are released during the backward as
  in the graph they came from, not at the end of the step;
- inside a phase, every compute region that ``lancet.graph.regions`` marks for
  compilation is one call (``torch.fx.passes.utils.fuser_utils.fuse_as_graphmodule``
  moves its nodes into a submodule, called where its last node was); collectives,
  their waits, host copies and host waits, and the regions that are not compiled
  stay as they were, in the order the plan gave them. (Not ``fuse_by_partitions``:
  it re-sorts the whole graph afterwards, and in some torch versions with a
  topological sort that does not keep the order of independent nodes, which is
  the schedule.)

Contract: the program computes what the graph computes; the boundary nodes keep
their relative order and each collective's window holds exactly the compute
nodes it held in the graph (regions never hold a boundary, and a region is a run
of consecutive nodes, so it sits where its nodes were). The source graph is not
changed; ``build_program`` checks that the program runs the source graph's nodes
in the source graph's order and raises otherwise.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from lancet.capture.trace import TrainGraph
from lancet.graph import meta
from lancet.graph.regions import MIN_KERNELS, Region, cut_regions, first_backward_node
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


class ListArgsCodeGen(fx.CodeGen):
    """Generated ``forward(self, args)`` takes its inputs in one list and empties it before running.

    The caller passes the only other references in the list, so every input is freed at its last use in
    the module (the generated code drops each value after its last use) rather than when the call returns.
    """

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *args, **kwargs) -> str:
        names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
        name = getattr(self, "_func_name", "forward")
        lines = [f"def {name}(self, args){maybe_return_annotation}:"]
        if names:
            lines.append(f"    {', '.join(names)}, = args")
        lines.append("    args.clear()")
        return "\n".join(lines)


class PhaseCall(nn.Module):
    """One phase as called from the top module: a profiler range around ``impl`` (the phase module by default).

    Called with its arguments in a list, which it empties (``ListArgsCodeGen``).
    """

    def __init__(self, phase: str, module: fx.GraphModule) -> None:
        super().__init__()
        self.phase = phase
        self.module = module
        module.graph.set_codegen(ListArgsCodeGen())
        module.recompile()
        self.impl = module.forward
        self.annotation = PHASE_ANNOTATION.format(phase=phase)

    def forward(self, args: list):
        with torch.profiler.record_function(self.annotation):
            return self.impl(args)


_INPUT, _OUTPUT, _CONSTANT, _PHASE, _ITEM, _CALL = range(6)


class _TopRunner:
    """Runs a program's top module node by node: each value is dropped at its last use, and a phase is
    called with its arguments in a list it empties, after the runner has dropped its own references.

    What each node does (its phase module, the tuple item it takes, a lifted constant) and which values
    die after it are worked out once, here; a step only follows that list.
    """

    def __init__(self, top: fx.GraphModule) -> None:
        nodes = list(top.graph.nodes)
        last_user: dict[fx.Node, fx.Node] = {}
        for node in nodes:
            for value in node.all_input_nodes:
                last_user[value] = node
        dead_after: dict[fx.Node, list[fx.Node]] = defaultdict(list)
        for value, user in last_user.items():
            dead_after[user].append(value)
        self.steps = [(node, *self._action(top, node), tuple(dead_after.get(node, ()))) for node in nodes]

    @staticmethod
    def _action(top: fx.GraphModule, node: fx.Node) -> tuple[int, object]:
        if node.op == "placeholder":
            return _INPUT, None
        if node.op == "output":
            return _OUTPUT, node.args[0]
        if node.op == "get_attr":  # a constant the trace lifted (e.g. a scalar tensor)
            return _CONSTANT, operator.attrgetter(node.target)(top)
        if node.op == "call_module":
            return _PHASE, getattr(top, node.target)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and not node.kwargs:
            return _ITEM, node.args
        if node.op == "call_function":
            return _CALL, node.target
        raise RuntimeError(f"unexpected node {node.format_node()} in a step program's top module")

    def __call__(self, inputs: tuple):
        env: dict[fx.Node, object] = {}
        given = iter(inputs)
        for node, kind, what, dead in self.steps:
            if kind == _ITEM:
                source, index = what
                env[node] = env[source][index]
            elif kind == _INPUT:
                env[node] = next(given)
            elif kind == _PHASE:
                args = list(fx.node.map_arg(node.args, env.__getitem__))  # the only references but env's
                for value in dead:
                    del env[value]
                env[node] = what(args)  # the phase empties ``args``
                continue
            elif kind == _CONSTANT:
                env[node] = what
            elif kind == _CALL:
                env[node] = what(*fx.node.map_arg(node.args, env.__getitem__),
                                 **fx.node.map_arg(node.kwargs, env.__getitem__))
            else:
                return fx.node.map_arg(what, env.__getitem__)
            for value in dead:
                del env[value]
        raise RuntimeError("a step program's top module has no output")


def forward_outputs_kept(top: fx.GraphModule, phase: PhaseCall) -> set[int] | None:
    """Indices of ``phase``'s outputs that the program returns (None: all of them, for a phase whose call
    result is returned whole). The others only feed later phases."""
    call = next(n for n in top.graph.nodes if n.op == "call_module" and getattr(top, n.target) is phase)
    kept: set[int] = set()
    for user in call.users:
        if user.op == "output":
            return None
        if user.target is operator.getitem and any(u.op == "output" for u in user.users):
            kept.add(user.args[1])
    return kept


@dataclass(slots=True)
class StepProgram:
    """A step graph as phases of regions; ``top`` takes the graph's inputs and returns its outputs."""

    top: fx.GraphModule
    regions: list[Region]
    """Every region of the source graph (compiled or not), in graph order."""
    calls: dict[int, RegionCall] = field(default_factory=dict)
    """Region index -> its call, for the regions that are compiled."""
    phases: list[PhaseCall] = field(default_factory=list)
    runner: _TopRunner | None = None

    def __post_init__(self) -> None:
        self.runner = _TopRunner(self.top)

    def __call__(self, *inputs):
        return self.runner(inputs)


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new module over a copy of ``gm``'s graph (node meta shared shallowly) and the node map."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    return fx.GraphModule(gm, graph), env


def _fuse(gm: fx.GraphModule, nodes: list[fx.Node], name: str) -> fx.Node:
    """Move ``nodes`` (consecutive, in order) into submodule ``name``, called where the last of them was."""
    module, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, always_return_tuple=True)
    gm.add_submodule(name, module)
    inside = set(nodes)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(name, args=inputs)
    anchor = call
    for i, output in enumerate(outputs):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.call_function(operator.getitem, (call, i))
        output.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return call


def _fuse_regions(gm: fx.GraphModule, regions: list[Region], env: dict[fx.Node, fx.Node]) -> dict[int, RegionCall]:
    """Move each compiled region into a submodule called where its nodes were; returns the calls by region index."""
    calls: dict[int, RegionCall] = {}
    for region in (r for r in regions if r.compiled):
        name = f"{REGION_PREFIX}{region.index}"
        node = _fuse(gm, [env[n] for n in region.nodes], name)
        node.meta[meta.CUSTOM] = {meta.PHASE: region.phase}
        calls[region.index] = RegionCall(region, getattr(gm, name))
        setattr(gm, name, calls[region.index])
    gm.graph.lint()
    gm.recompile()
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


def build_program(train_graph: TrainGraph, *, fuse: bool = True, min_kernels: int = MIN_KERNELS) -> StepProgram:
    """The program of ``train_graph``: phases, and (with ``fuse``) its compiled regions as calls.

    The regions' calls run their traced modules until an executor sets their
    ``impl`` to a compiled function.
    """
    regions = cut_regions(train_graph.graph, min_kernels)
    gm, env = _copy(train_graph.gm)
    first = first_backward_node(train_graph.graph)
    calls = _fuse_regions(gm, regions, env) if fuse else {}
    cut_node = None
    if first is not None:  # the first backward node, or the call of the region that starts with it
        region = next((r for r in regions if r.nodes[0] is first), None)
        cut_node = env[first] if region is None or region.index not in calls else next(
            n for n in gm.graph.nodes if n.op == "call_module" and getattr(gm, n.target) is calls[region.index])
    top, phases = _phase_split(gm, cut_node)
    program = StepProgram(top=top, regions=regions, calls=calls, phases=phases)
    if program_order(program) != [n.name for n in train_graph.graph.nodes if n.op == "call_function"]:
        raise RuntimeError(f"building the step program changed the order of the graph's nodes (torch "
                           f"{torch.__version__}); the schedule would not be kept")
    return program


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
