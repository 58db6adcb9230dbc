"""Choose which ranges of the forward to partition, and into how many parts.

Contract
--------
- Reads the forward graph and a cost model; changes nothing; returns
  ``PartitionDecisions`` (possibly empty: nothing is partitioned unless the
  simulator predicts a gain) and the predicted forward times.
- Deterministic for equal inputs, so every rank derives the same decisions.

Pseudo-code (Lancet's range search, on module-aligned groups)
-------------------------------------------------------------
    for each MoE layer (block b):
        starts = {b's attention, b's second layer norm, the MoE layer itself}
        ends   = {end of block b, end of block b+1's attention}
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

from lancet.capture.trace import ForwardGraph
from lancet.cost.model import NodeCosts
from lancet.passes.partition.rewrite import PartitionDecisions, PartitionError, Region, is_dispatch, partition_pass
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

    def to_json(self) -> dict:
        return {
            "base_forward_ms": self.base_forward_ms,
            "forward_ms": self.forward_ms,
            "candidates": [
                {**c.region.to_json(), "forward_ms": c.forward_ms, "gain_ms": c.gain_ms} for c in self.candidates
            ],
        }


def _module(node: fx.Node) -> str:
    return node.meta.get("custom", {}).get("module", "")


def _spans(graph: fx.Graph) -> dict[str, tuple[str, str]]:
    """First and last node of every module prefix (``blocks.3``, ``blocks.3.attn``, ...)."""
    spans: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:
        module = _module(node)
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            first = spans.get(prefix, (node.name, node.name))[0]
            spans[prefix] = (first, node.name)
    return spans


def moe_layers(graph: fx.Graph) -> list[str]:
    """Module names of the MoE layers whose dispatch is in the graph, in order (e.g. ``blocks.0.mlp``).

    A layer's first dispatch node is made by the layer itself; later ones may come from its submodules.
    """
    found: list[str] = []
    for node in graph.nodes:
        if is_dispatch(node):
            module = _module(node)
            if not any(module == layer or module.startswith(layer + ".") for layer in found):
                found.append(module)
    return found


def moe_blocks(graph: fx.Graph) -> list[str]:
    """The modules holding each MoE layer (e.g. ``blocks.0``), in order."""
    return [layer.rsplit(".", 1)[0] for layer in moe_layers(graph)]


def _next_block(block: str) -> str:
    stem, index = block.rsplit(".", 1)
    return f"{stem}.{int(index) + 1}"


def candidate_ranges(graph: fx.Graph) -> list[tuple[str, str]]:
    """(start, end) node names around each MoE layer, module-aligned, ranges of one layer nested."""
    spans = _spans(graph)
    ranges = []
    for block in moe_blocks(graph):
        starts = [spans[f"{block}.{sub}"][0] for sub in ("ln_1", "ln_2", "mlp") if f"{block}.{sub}" in spans]
        ends = [spans[block][1]]
        following = _next_block(block)
        if f"{following}.attn" in spans and f"{following}.ln_2" in spans:
            order = {n.name: i for i, n in enumerate(graph.nodes)}
            before_ln2 = list(graph.nodes)[order[spans[f"{following}.ln_2"][0]] - 1]
            ends.append(before_ln2.name)
        ranges += [(s, e) for s in starts for e in ends]
    return ranges


def dispatch_ranges(graph: fx.Graph) -> list[tuple[str, str]]:
    """Each MoE layer's dispatch stage alone: all-to-alls and experts (the Tutel-style range)."""
    ranges = []
    for layer in moe_layers(graph):
        names = [n.name for n in graph.nodes if is_dispatch(n) and (_module(n) + ".").startswith(layer + ".")]
        ranges.append((names[0], names[-1]))
    return ranges


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
    for start, end in candidate_ranges(forward.graph):
        best: Candidate | None = None
        for parts in range(2, max_parts + 1):
            if batch_size % parts:
                continue
            region = Region(start, end, parts)
            try:
                partitioned = partition_pass(forward, PartitionDecisions([region]), batch_size)
            except PartitionError:
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
    return Selection(decisions=decisions, base_forward_ms=base, forward_ms=forward_ms, candidates=candidates)
