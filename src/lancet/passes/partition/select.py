"""Choose which ranges of the forward to partition, and into how many parts.

Contract
--------
- Reads the forward graph and a cost model; changes nothing; returns
  ``PartitionDecisions`` (possibly empty: nothing is partitioned unless the
  simulator predicts a gain) and the predicted forward times.
- Deterministic for equal inputs, so every rank derives the same decisions.

Candidate ranges come from the graph, never from module names: a MoE layer is
its dispatch stage (``lancet.graph.analysis.dispatch_stages``); a *seam* is a
run of consecutive points of the forward where exactly one value with tokens is
live (the residual stream between a transformer's sublayers). A range starts
at one of the two seams before the layer (after the previous layer) or at the
dispatch stage itself, and ends at one of the two seams after it (before the
next layer). Why a layer has no range, or a range runs whole from some node on,
is reported as ``Finding`` records (``lancet.passes.partition.findings``).

Pseudo-code (Lancet's range search)
-----------------------------------
    for each MoE layer (dispatch stage [d0, d1]):
        starts = {last 2 seams in (previous d1, d0), d0}
        ends   = {first 2 seams in (d1, next d0)}
        for each (start, end): for n = 2, 3, ... up to max_parts (divisors of the batch):
            gain = simulated forward time unpartitioned - with this one region partitioned
            stop at the first n that does not improve on n-1
    pick non-overlapping ranges maximising the summed gain (dynamic program over ranges
    sorted by end: best[i] = max(best[i-1], gain_i + best[last range ending before i starts]))
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

import torch

from lancet.capture.trace import ForwardGraph
from lancet.cost.model import NodeCosts
from lancet.graph.analysis import dispatch_stages
from lancet.passes.partition.axes import REPLICATED, Inferred
from lancet.passes.partition.findings import (
    NO_GAIN, NO_MOE_LAYER, NO_RANGE, NO_RULE, NOT_PARTITIONABLE, Finding, about, unique_by_op,
)
from lancet.passes.partition.rewrite import PartitionDecisions, PartitionError, Region, infer_forward_axes, partition_pass
from lancet.sim.simulator import simulate


@dataclass(slots=True)
class Candidate:
    region: Region
    forward_ms: float
    gain_ms: float


@dataclass(slots=True)
class Selection:
    decisions: PartitionDecisions
    base_forward_ms: float
    forward_ms: float
    candidates: list[Candidate] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    """Why no range was found, or why ranges run whole from some node on."""

    def to_json(self) -> dict:
        return {
            "base_forward_ms": self.base_forward_ms,
            "forward_ms": self.forward_ms,
            "findings": [f.to_json() for f in self.findings],
            "candidates": [
                {**c.region.to_json(), "forward_ms": c.forward_ms, "gain_ms": c.gain_ms} for c in self.candidates
            ],
        }


def _spans(graph: fx.Graph, stages: list[list[fx.Node]]) -> list[tuple[int, int]]:
    """(first, last) graph position of each MoE layer's dispatch stage, in order."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    return [(position[stage[0]], position[stage[-1]]) for stage in stages]


def _seams(graph: fx.Graph, axes: dict[fx.Node, Inferred]) -> list[tuple[int, int]]:
    """Runs of consecutive boundaries (boundary b: just before node b) where exactly one value with tokens
    is live: a residual stream between blocks. Each run as (first boundary, last boundary)."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    delta = [0] * (len(nodes) + 2)
    for node in nodes:
        found = axes.get(node)
        if node.op != "call_function" or found is None or found.axis == REPLICATED:
            continue
        uses = [position[u] for u in node.users if u.op != "output"]
        if uses:
            delta[position[node] + 1] += 1
            delta[max(uses) + 1] -= 1
    runs: list[tuple[int, int]] = []
    live = 0
    for b in range(len(nodes)):
        live += delta[b]
        if live == 1 and nodes[b].op == "call_function":
            if runs and runs[-1][1] == b - 1:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((b, b))
    return runs


def _layer_candidates(spans: list[tuple[int, int]], seams: list[tuple[int, int]], num_nodes: int
                      ) -> list[tuple[list[int], list[int]]]:
    """Per MoE layer: candidate start positions (earliest first) and end positions (earliest first)."""
    found = []
    for i, (first, last) in enumerate(spans):
        before = spans[i - 1][1] if i else -1
        after = spans[i + 1][0] if i + 1 < len(spans) else num_nodes
        # A run reaching the stage (a chain of ops with no residual beside it) offers its far end instead.
        starts = [run[1] if run[1] < first else run[0] for run in seams if before < run[1] and run[0] < first]
        ends = [(run[0] if run[0] > last + 1 else run[1]) - 1 for run in seams if last < run[1] and run[0] <= after]
        starts = list(dict.fromkeys(starts[-2:] + [first]))
        found.append((starts, list(dict.fromkeys(ends))[:2]))
    return found


@dataclass(slots=True)
class _Layers:
    """What the range search reads of a forward graph, derived once: its MoE layers' dispatch stages, their
    candidate starts and ends, and why nodes have no token axis."""

    nodes: list[fx.Node]
    stages: list[list[fx.Node]]
    candidates: list[tuple[list[int], list[int]]]
    reasons: dict[fx.Node, str]

    @classmethod
    def of(cls, forward: ForwardGraph, batch_size: int) -> _Layers:
        graph = forward.graph
        stages = dispatch_stages(graph)
        dispatch = {n for stage in stages for n in stage}
        reasons: dict[fx.Node, str] = {}
        axes = infer_forward_axes(graph, len(forward.param_names), batch_size, reasons, dispatch=dispatch)
        nodes = list(graph.nodes)
        candidates = _layer_candidates(_spans(graph, stages), _seams(graph, axes), len(nodes))
        return cls(nodes, stages, candidates, reasons)

    def ranges(self) -> list[tuple[str, str]]:
        ranges = [(self.nodes[s].name, self.nodes[e].name) for starts, ends in self.candidates
                  for s in starts for e in ends]
        return list(dict.fromkeys(ranges))

    def findings(self) -> list[Finding]:
        if not self.stages:
            return [Finding(NO_MOE_LAYER, "no MoE layer found in the forward graph (no token all-to-all pair, no "
                                          "dispatch_region mark): nothing to partition")]
        ranges = self.ranges()
        position = {n.name: i for i, n in enumerate(self.nodes)}
        findings = [
            about(stage[0], NO_RANGE, f"MoE layer {i} has no candidate range: no point around it where a single "
                                      "value with tokens is live")
            for i, stage in enumerate(self.stages)
            if not any(position[s] <= position[stage[0].name] and position[stage[-1].name] <= position[e]
                       for s, e in ranges)
        ]
        inside = {n for s, e in ranges for n in self.nodes[position[s] : position[e] + 1]}
        for node, reason in self.reasons.items():
            if node in inside and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                findings.append(about(node, NO_RULE, f"runs whole, cutting the per-part pipeline short: {reason}"))
        return unique_by_op(findings)


def candidate_ranges(forward: ForwardGraph, batch_size: int) -> list[tuple[str, str]]:
    """(start, end) node names around each MoE layer, from the graph alone (see the module docstring)."""
    return _Layers.of(forward, batch_size).ranges()


def block_ranges(forward: ForwardGraph, batch_size: int) -> list[tuple[str, str]]:
    """Per MoE layer, from its earliest candidate start to its earliest candidate end (a transformer block
    holding the layer: attention through the MoE sublayer)."""
    layers = _Layers.of(forward, batch_size)
    return [(layers.nodes[starts[0]].name, layers.nodes[ends[0]].name) for starts, ends in layers.candidates
            if ends]


def dispatch_ranges(graph: fx.Graph) -> list[tuple[str, str]]:
    """Each MoE layer's dispatch stage alone: all-to-alls and experts (the Tutel-style range)."""
    return [(stage[0].name, stage[-1].name) for stage in dispatch_stages(graph)]


def range_findings(forward: ForwardGraph, batch_size: int) -> list[Finding]:
    """Why ranges are missing or cut short, without pricing anything (``lancet inspect``, the search)."""
    return _Layers.of(forward, batch_size).findings()


def _best_non_overlapping(candidates: list[Candidate], position: dict[str, int]) -> list[Candidate]:
    useful = sorted((c for c in candidates if c.gain_ms > 0), key=lambda c: position[c.region.end])
    ends = [position[c.region.end] for c in useful]
    best = [0.0] * (len(useful) + 1)
    take: list[bool] = [False] * len(useful)
    for i, cand in enumerate(useful):
        previous = bisect.bisect_left(ends, position[cand.region.start], 0, i)
        with_it = cand.gain_ms + best[previous]
        take[i] = with_it > best[i]
        best[i + 1] = max(best[i], with_it)
    chosen, i = [], len(useful)
    while i > 0:
        cand = useful[i - 1]
        if take[i - 1]:
            chosen.append(cand)
            i = bisect.bisect_left(ends, position[cand.region.start], 0, i - 1)
        else:
            i -= 1
    return sorted(chosen, key=lambda c: position[c.region.start])


def select_partitions(
    forward: ForwardGraph,
    price: Callable[[fx.Graph], NodeCosts],
    batch_size: int,
    *,
    max_parts: int = 8,
    progress: Callable[[], None] | None = None,
) -> Selection:
    """Search ranges and part counts with the simulator (see module docstring)."""
    base = simulate(forward.graph, price(forward.graph)).makespan_ms
    position = {n.name: i for i, n in enumerate(forward.graph.nodes)}
    candidates: list[Candidate] = []
    layers = _Layers.of(forward, batch_size)
    findings = layers.findings()
    for start, end in layers.ranges():
        best: Candidate | None = None
        for parts in range(2, max_parts + 1):
            if batch_size % parts:
                continue
            region = Region(start, end, parts)
            try:
                partitioned = partition_pass(forward, PartitionDecisions([region]), batch_size)
            except PartitionError as err:
                findings.append(Finding(NOT_PARTITIONABLE, f"range {start}..{end} in {parts} parts: {err}"))
                break
            ms = simulate(partitioned.graph, price(partitioned.graph)).makespan_ms
            if progress is not None:
                progress()
            if best is not None and ms >= best.forward_ms:
                break
            best = Candidate(region, ms, base - ms)
        if best is not None:
            candidates.append(best)
    chosen = _best_non_overlapping(candidates, position)
    decisions = PartitionDecisions([c.region for c in chosen])
    forward_ms = base
    if chosen:
        joint = partition_pass(forward, decisions, batch_size)
        forward_ms = simulate(joint.graph, price(joint.graph)).makespan_ms
        if forward_ms >= base:
            decisions, forward_ms = PartitionDecisions(), base
    if candidates and not decisions.regions:
        findings.append(Finding(NO_GAIN, f"none of {len(candidates)} candidate ranges shortens the simulated "
                                         f"forward ({base:.3f} ms)"))
    return Selection(decisions=decisions, base_forward_ms=base, forward_ms=forward_ms, candidates=candidates,
                     findings=findings)
