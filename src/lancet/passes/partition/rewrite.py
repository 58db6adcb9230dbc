"""Partition ranges of the forward graph into parts along the token (batch) axis.

Contract
--------
- Input: a ``ForwardGraph`` and regions, each a contiguous range of forward
  nodes (by name, inclusive) and a number of parts ``n`` that divides the
  batch. Output: a new forward graph computing the same loss and keep masks
  (up to float reassociation of sums over parts; keep masks identical) for
  ragged MoE layers (whole-batch drops). A padded MoE layer inside a region
  computes the loss and keep masks of micro-batches instead: each part routes
  its own tokens with its own capacity (``drop_semantics``).
- In a region every node runs per part on its slice of the tokens when it is
  part-exact (``lancet.passes.partition.axes``); a cumsum along tokens runs per part
  plus the sum of the earlier parts (exact for the integer counts the gates
  use); the MoE dispatch stage (nodes annotated ``moe_stage == "dispatch"``)
  runs per part on the part's own tokens: each part sorts its tokens, ships
  only them through its own irregular all-to-all, and combines them back, which
  the MoE layer's row-locality makes exact (ragged); or each part computes its
  slots with the capacity of its own tokens, scatters them into its own
  ``[E, C_part, M]`` buffer and ships it through its own equal-split all-to-all
  (padded: the custom ops derive the capacity from their input, reshapes keep
  the capacity dim as -1, so the copies need no rewritten constants). Every other node (a sort of
  probabilities for batch-prioritized routing, reductions over tokens, ops
  without a rule) runs once on the whole tensor, gathered from the parts.
- Values leaving the region are concatenated along their token dim. Nodes of
  the range that do not depend on tokens (weight casts) are computed once.
- Raises ``PartitionError`` (never degrades silently) when a region is not
  partitionable: a MoE dispatch stage only partly inside, a part-local value
  that would have to leave its parts, a batch not divisible by ``n``.
- MoE dispatch stages are those ``lancet.graph.analysis.dispatch_stages``
  finds (marked, or derived from the all-to-alls); derived stages are marked
  on the copy.
- In place on nothing: the pass copies the graph. New nodes carry
  ``lancet.graph.meta`` ``PART``/``PARTS``/``ORIGIN``/``REGION`` for the
  pipeline order (``lancet.passes.pipeline``, the next listed pass), the
  count merge (``lancet.passes.merge_counts``) and the cost model; the
  region's nodes are emitted in a valid (unpipelined) order.

Pseudo-code
-----------
    axes = infer token axes over the whole forward graph
    for each region: classify nodes (hoisted / dispatch / part / carry / whole), repair edges
        emit per node: n part copies (sliced inputs, token sizes / n) or one whole copy (gathered inputs)
        route uses outside the region to the concatenation of the parts
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from lancet.capture.trace import ForwardGraph
from lancet.graph import meta, ops
from lancet.graph.analysis import dispatch_stages
from lancet.graph.lazy_module import lazy_graph_module
from lancet.graph.roles import carries_tokens, collective_kind
from lancet.moe.gates import capacity
from lancet.passes.partition.axes import REPLICATED, Axis, Context, Inferred, NoRule, TOKEN, infer
from lancet.passes.merge_counts import merge_counts_pass
from lancet.passes.pipeline import pipeline_order_pass
from lancet.passes.protocol import Pass, PassResult, run_passes

aten = torch.ops.aten
HOISTED, DISPATCH, PART, CARRY, WHOLE = "hoisted", "dispatch", "part", "carry", "whole"
UNKNOWN = Axis("unknown")
_SIZE_ARG_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default}


class PartitionError(ValueError):
    """A region cannot be partitioned as asked."""


@dataclass(frozen=True, slots=True)
class Region:
    start: str
    end: str
    parts: int

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "parts": self.parts}

    @classmethod
    def from_json(cls, data: dict) -> Region:
        return cls(start=data["start"], end=data["end"], parts=int(data["parts"]))


@dataclass(slots=True)
class PartitionDecisions:
    regions: list[Region] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"regions": [r.to_json() for r in self.regions]}

    @classmethod
    def from_json(cls, data: dict) -> PartitionDecisions:
        return cls(regions=[Region.from_json(r) for r in data["regions"]])


MICRO_BATCH, WHOLE_BATCH = "micro-batch", "whole-batch"


def drop_semantics(graph: fx.Graph) -> str:
    """How partitioned MoE layers of ``graph`` drop tokens.

    ``micro-batch``: padded dispatch, each part routes its own tokens with its own capacity
    ``int(cf * ceil((T / n) / E))``. ``whole-batch``: ragged dispatch, the drops of the unpartitioned layer.
    Both when the graph has layers of both kinds ("micro-batch+whole-batch"); "" without MoE layers.
    """
    stages = dispatch_stages(graph)
    padded = [s for s in stages if any(n.target == ops.CAPACITY_SLOTS for n in s)]
    ragged = [s for s in stages if not any(n.target == ops.CAPACITY_SLOTS for n in s)]
    kinds = [name for name, layers in ((MICRO_BATCH, padded), (WHOLE_BATCH, ragged)) if layers]
    return "+".join(kinds)


class _StrictContext(Context):
    def axis(self, arg) -> Axis:
        axis = super().axis(arg)
        if axis.kind in ("unknown", "rows"):
            raise NoRule(f"input {arg.name} has no token axis")
        return axis


def infer_forward_axes(
    graph: fx.Graph, num_params: int, batch_size: int, reasons: dict[fx.Node, str] | None = None,
    dispatch: set[fx.Node] | None = None,
) -> dict[fx.Node, Inferred]:
    """Axes of every forward node (params replicated, tokens/targets on dim 0); unknown where no rule applies.

    Dispatch-stage nodes are ``rows`` (part-local); one consumed outside its stage (or returned) must be
    token-major: the combine's output, or the keep mask the padded dispatch decides. It is ``TOKEN(0)``.
    ``reasons`` (if given) receives why each unknown node has no axis. ``dispatch``: the dispatch-stage
    nodes (default: the marked ones).
    """
    in_dispatch = meta.is_dispatch if dispatch is None else dispatch.__contains__
    axes: dict[fx.Node, Inferred] = {}
    ctx = _StrictContext(axes, batch_size)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        axes[node] = Inferred(REPLICATED if i < num_params else TOKEN(0))
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if in_dispatch(node):
            leaves = any(not in_dispatch(u) for u in node.users)
            axes[node] = Inferred(TOKEN(0) if leaves else Axis("rows"), exact=False)
            continue
        try:
            axes[node] = infer(node, ctx)
        except NoRule as err:
            axes[node] = Inferred(UNKNOWN, exact=False)
            if reasons is not None:
                reasons[node] = str(err)
    return axes


def _axis_of(axes: dict[fx.Node, Inferred], node: fx.Node) -> Axis:
    found = axes.get(node)
    if found is None or isinstance(found.axis, tuple):
        return UNKNOWN
    return found.axis


def _gatherable(axis: Axis) -> bool:
    return axis.kind == "token" or axis == REPLICATED


@dataclass
class _Region:
    spec: Region
    nodes: list[fx.Node]
    mode: dict[fx.Node, str]


def _range(graph: fx.Graph, spec: Region) -> list[fx.Node]:
    nodes = list(graph.nodes)
    names = {n.name: i for i, n in enumerate(nodes)}
    if spec.start not in names or spec.end not in names:
        raise PartitionError(f"region {spec.start}..{spec.end} names nodes the forward graph does not have")
    lo, hi = names[spec.start], names[spec.end]
    if lo > hi:
        raise PartitionError(f"region start {spec.start} comes after its end {spec.end}")
    return [n for n in nodes[lo : hi + 1] if n.op == "call_function"]


def _classify(nodes: list[fx.Node], axes: dict[fx.Node, Inferred]) -> dict[fx.Node, str]:
    members = set(nodes)
    mode: dict[fx.Node, str] = {}
    for node in nodes:
        inferred = axes[node]
        inside = [p for p in node.all_input_nodes if p in members and mode.get(p) != HOISTED]
        outside_token = [p for p in node.all_input_nodes if p not in members and _axis_of(axes, p) != REPLICATED]
        if meta.is_dispatch(node):
            mode[node] = DISPATCH
        elif not inside and not outside_token and inferred.axis == REPLICATED:
            mode[node] = HOISTED
        elif node.target is operator.getitem:
            mode[node] = mode.get(node.args[0], WHOLE) if node.args[0] in members else WHOLE
        elif inferred.carry:
            mode[node] = CARRY
        else:
            outputs = inferred.axis if isinstance(inferred.axis, tuple) else (inferred.axis,)
            splittable = inferred.exact and all(a.kind in ("token", "replicated") for a in outputs)
            mode[node] = PART if splittable else WHOLE
    _repair(nodes, axes, mode)
    return mode


def _repair(nodes: list[fx.Node], axes: dict[fx.Node, Inferred], mode: dict[fx.Node, str]) -> None:
    """Make every edge between per-part and whole computation carry a value that can be sliced or gathered."""
    members = set(nodes)
    split = (PART, CARRY, DISPATCH)
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if mode[node] in (HOISTED,):
                continue
            for producer in node.all_input_nodes:
                producer_mode = mode.get(producer, "external") if producer in members else "external"
                axis = _axis_of(axes, producer)
                if mode[node] in split and producer_mode in ("external", WHOLE, HOISTED):
                    if producer_mode == HOISTED or _gatherable(axis):
                        continue
                    changed |= _make_whole(node, mode)
                elif mode[node] == WHOLE and producer_mode in split and not _gatherable(axis):
                    changed |= _make_whole(producer, mode)
                elif mode[node] in split and producer_mode in split and mode[node] != DISPATCH and producer_mode == DISPATCH:
                    if not _gatherable(axis):
                        raise PartitionError(f"{node.name} reads a part-local value of the MoE dispatch ({producer.name})")
            if mode[node] in split and any(u not in members and u.op != "output" for u in node.users):
                if not _gatherable(_axis_of(axes, node)) and node.target is not operator.getitem:
                    changed |= _make_whole(node, mode)
            if node.target is operator.getitem and node.args[0] in members:
                if mode[node] != mode[node.args[0]] and mode[node.args[0]] != HOISTED:
                    mode[node] = mode[node.args[0]]
                    changed = True


def _make_whole(node: fx.Node, mode: dict[fx.Node, str]) -> bool:
    if mode[node] == DISPATCH:
        raise PartitionError(f"{node.name} belongs to the MoE dispatch stage but would have to run whole")
    if mode[node] == WHOLE:
        return False
    mode[node] = WHOLE
    return True


def _check_dispatch_complete(stages: list[list[fx.Node]], nodes: list[fx.Node]) -> None:
    members = set(nodes)
    for i, stage in enumerate(stages):
        inside = [n for n in stage if n in members]
        if inside and len(inside) != len(stage):
            outside = next(n for n in stage if n not in members)
            raise PartitionError(
                f"the dispatch stage of MoE layer {i} ({meta.module(stage[0]) or 'no module'}) is only partly "
                f"inside the region ({outside.name} is not)"
            )


def _check_part_capacity(nodes: list[fx.Node], parts: int) -> None:
    """Each part of a padded layer needs a capacity of at least one slot per expert."""
    for node in nodes:
        if node.target != ops.CAPACITY_SLOTS:
            continue
        tokens = int(node.args[0].meta["val"].shape[0]) // parts
        num_experts, capacity_factor = node.args[2], node.args[3]
        if capacity(tokens, num_experts, capacity_factor) < 1:
            raise PartitionError(
                f"{meta.module(node) or node.name}: a part of {tokens} tokens has capacity 0 for {num_experts} experts at capacity "
                f"factor {capacity_factor:g}"
            )


class _Rewriter:
    """Emits the partitioned copies of one region right before it and reroutes its outside uses."""

    def __init__(self, graph: fx.Graph, region: _Region, axes: dict[fx.Node, Inferred], index: int) -> None:
        self.graph = graph
        self.index = index
        self.region = region
        self.n = region.spec.parts
        self.axes = axes
        self.members = set(region.nodes)
        self.parts: list[dict[fx.Node, fx.Node]] = [{} for _ in range(self.n)]
        self.whole: dict[fx.Node, fx.Node] = {}
        self.slices: dict[fx.Node, list[fx.Node]] = {}
    def _marks(self, part: int | None, origin: fx.Node) -> dict:
        marks = {meta.PART: part, meta.PARTS: self.n, meta.ORIGIN: origin.name, meta.REGION: self.index}
        if collective_kind(origin) == "all_to_all":
            marks[meta.TOKEN_ROWS] = carries_tokens(origin)  # copies have no fake value to tell
        return marks

    def _new(self, target, args, kwargs=None, *, part: int | None, origin: fx.Node) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        node.meta[meta.CUSTOM] = {meta.PHASE: meta.FORWARD, **self._marks(part, origin)}
        return node

    def _mode(self, node: fx.Node) -> str:
        return self.region.mode.get(node, "external") if node in self.members else "external"

    def part_value(self, value, k: int):
        if not isinstance(value, fx.Node):
            return value
        mode = self._mode(value)
        if mode in (PART, CARRY, DISPATCH):
            return self.parts[k][value]
        source = self.whole.get(value, value)
        axis = _axis_of(self.axes, value)
        if mode == HOISTED or axis == REPLICATED or axis.kind != "token":
            return source
        if value not in self.slices:
            # One split (its backward is a cat) rather than n slices (each backward zero-fills a whole tensor).
            step = _token_size(value, axis) // self.n
            pieces = self._new(aten.split.Tensor, (source, step, axis.dim), part=None, origin=value)
            self.slices[value] = [
                self._new(operator.getitem, (pieces, i), part=i, origin=value) for i in range(self.n)
            ]
        return self.slices[value][k]

    def whole_value(self, value):
        if not isinstance(value, fx.Node):
            return value
        mode = self._mode(value)
        if mode == WHOLE:
            return self.whole[value]
        if mode not in (PART, CARRY, DISPATCH):
            return value
        if value in self.whole:
            return self.whole[value]
        axis = _axis_of(self.axes, value)
        if axis == REPLICATED:
            self.whole[value] = self.parts[0][value]
        else:
            pieces = [self.parts[k][value] for k in range(self.n)]
            self.whole[value] = self._new(aten.cat.default, (pieces, axis.dim), part=None, origin=value)
        self._stands_for(self.whole[value], value)
        return self.whole[value]

    def _stands_for(self, replacement: fx.Node, original: fx.Node) -> None:
        """``replacement`` holds the whole value of ``original``: same fake value, same axis (for later regions)."""
        if "val" in original.meta:
            replacement.meta["val"] = original.meta["val"]
        self.axes[replacement] = self.axes[original]

    def emit_part(self, node: fx.Node, k: int) -> None:
        copy = self.graph.node_copy(node, lambda a: self.part_value(a, k))
        copy.meta = {key: v for key, v in node.meta.items() if key != "val"}
        copy.meta[meta.CUSTOM] = {**meta.custom(node), **self._marks(k, node)}
        if node.target in _SIZE_ARG_OPS:
            copy.args = (copy.args[0], self._scaled_shape(node), *copy.args[2:])
        self.parts[k][node] = copy

    def _scaled_shape(self, node: fx.Node) -> list:
        axis = _axis_of(self.axes, node)
        shape = list(node.args[1])
        if axis.kind == "token" and shape[axis.dim] != -1:
            if shape[axis.dim] % self.n:
                raise PartitionError(f"{node.name}: token size {shape[axis.dim]} is not divisible by {self.n}")
            shape[axis.dim] //= self.n
        return shape

    def emit_whole(self, node: fx.Node) -> None:
        copy = self.graph.node_copy(node, self.whole_value)
        copy.meta = {key: v for key, v in node.meta.items() if key != "val"}
        copy.meta[meta.CUSTOM] = {**meta.custom(node), **self._marks(None, node)}
        self.whole[node] = copy
        self._stands_for(copy, node)

    def emit_carry(self, node: fx.Node) -> None:
        """cumsum along tokens: part k adds the sums of parts 0..k-1 (exact for integer counts)."""
        dim = _axis_of(self.axes, node).dim
        carry = None
        for k in range(self.n):
            source = self.part_value(node.args[0], k)
            local = self._new(node.target, (source, *node.args[1:]), dict(node.kwargs), part=k, origin=node)
            self.parts[k][node] = local
            if carry is not None:
                self.parts[k][node] = self._new(aten.add.Tensor, (local, carry), part=k, origin=node)
            if k + 1 < self.n:
                total = self._new(aten.sum.dim_IntList, (source, [dim], True), part=k, origin=node)
                carry = total if carry is None else self._new(aten.add.Tensor, (carry, total), part=k, origin=node)

    def run(self) -> None:
        nodes = self.region.nodes
        anchor = next(n for n in nodes if self.region.mode[n] != HOISTED)
        for node in nodes:
            if self.region.mode[node] == HOISTED:
                anchor.prepend(node)
        with self.graph.inserting_before(anchor):
            for node in nodes:
                mode = self.region.mode[node]
                if mode in (PART, DISPATCH):
                    for k in range(self.n):
                        self.emit_part(node, k)
                elif mode == CARRY:
                    self.emit_carry(node)
                elif mode == WHOLE:
                    self.emit_whole(node)
            for node in nodes:
                if self.region.mode[node] == HOISTED:
                    continue
                for user in [u for u in node.users if u not in self.members]:
                    user.replace_input_with(node, self.whole_value(node))
        for node in reversed(nodes):
            if self.region.mode[node] != HOISTED:
                self.graph.erase_node(node)


def _token_size(node: fx.Node, axis: Axis) -> int:
    val = node.meta.get("val")
    return int(val.shape[axis.dim])


def _copy_graph(forward: ForwardGraph) -> fx.GraphModule:
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(forward.graph, value_map)
    graph.output(out)
    return lazy_graph_module(forward.gm, graph)  # searches rewrite many copies that never run


def mark_dispatch_stages(graph: fx.Graph) -> list[list[fx.Node]]:
    """Mark every derived (unmarked) dispatch stage of ``graph`` as dispatch; returns all stages."""
    stages = dispatch_stages(graph)
    for stage in stages:
        for node in stage:
            if not meta.is_dispatch(node):
                meta.update(node, **{meta.MOE_STAGE: meta.DISPATCH})
    return stages


def partition_rewrite_pass(
    forward: ForwardGraph, costs=None, *, decisions: PartitionDecisions, batch_size: int
) -> PassResult:
    """A copy of ``forward`` with every region of ``decisions`` rewritten into parts (see module contract).

    Decisions out: the regions rewritten. Not in place: ``forward`` is left as it was.
    """
    gm = _copy_graph(forward)
    stages = mark_dispatch_stages(gm.graph)
    axes = infer_forward_axes(gm.graph, len(forward.param_names), batch_size)
    done = []
    for index, spec in enumerate(decisions.regions):
        if spec.parts < 2:
            continue
        if batch_size % spec.parts:
            raise PartitionError(f"batch of {batch_size} samples cannot be split into {spec.parts} parts")
        nodes = _range(gm.graph, spec)
        _check_dispatch_complete(stages, nodes)
        _check_part_capacity(nodes, spec.parts)
        region = _Region(spec=spec, nodes=nodes, mode=_classify(nodes, axes))
        _Rewriter(gm.graph, region, axes, index).run()
        stages = [stage for stage in stages if not set(stage) & set(nodes)]  # rewritten: copies carry marks
        done.append(spec)
    partitioned = replace(forward, gm=gm, param_names=list(forward.param_names))
    return PassResult(partitioned, PartitionDecisions(done))


def partition_passes(decisions: PartitionDecisions, batch_size: int) -> list[Pass]:
    """The listed passes that partition a forward graph: the rewrite (a copy), the pipeline order and the
    count merge (both in place on that copy)."""
    rewrite = functools.partial(partition_rewrite_pass, decisions=decisions, batch_size=batch_size)
    return [
        Pass("partition", rewrite, in_place=False, order_only=False),
        Pass("pipeline-order", pipeline_order_pass, in_place=True, order_only=True),
        Pass("merge-counts", merge_counts_pass, in_place=True, order_only=False),
    ]


def partition_pass(forward: ForwardGraph, decisions: PartitionDecisions, batch_size: int) -> ForwardGraph:
    """A new ForwardGraph with every region of ``decisions`` partitioned, pipelined and its count exchanges
    merged (``partition_passes`` through the runner)."""
    return run_passes(forward, partition_passes(decisions, batch_size)).graph
