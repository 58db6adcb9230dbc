"""The plan: what the passes decided, as a file re-applied to a fresh capture on every rank.

A plan holds, per variant (``lancet-dw``: order passes only; ``lancet-part``:
partition only; ``lancet``: both), the decisions by node name and the
fingerprints of the graphs they were made for. Re-applying it to a capture
with another fingerprint (another model, gate, world size, device or torch) is
refused: every rank applies the same decisions to the same graph, so every
rank issues collectives in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from lancet.plan.artifact import ArtifactError, RunIdentity, identity_from_json, read_artifact, write_artifact
from lancet.capture.trace import ForwardGraph, TrainGraph, capture_forward, capture_step, capture_step_from_forward
from lancet.cost.model import NodeCosts
from lancet.cost.profile import graph_fingerprint
from lancet.graph.reorder import apply_order
from lancet.passes.allreduce_gaps import AllReduceDecisions, apply_allreduce_decisions
from lancet.passes.dw import DwDecisions, apply_dw_decisions
from lancet.passes.partition.rewrite import PartitionDecisions, partition_pass
from lancet.passes.protocol import run_passes
from lancet.plan.pipelines import ALLREDUCE_GAPS, DW, PARTITIONED_STEP, order_passes, order_pipelines
from lancet.sim.simulator import Timeline, simulate
from lancet.step.train_step import TrainStep

PLAN_VARIANTS = ("lancet-dw", "lancet-part", "lancet")


class PlanMismatch(ValueError):
    """The plan was made from a different graph."""


@dataclass(slots=True)
class VariantPlan:
    """Decisions of one variant: an optional partition, then order decisions on the resulting step graph."""

    partition: PartitionDecisions | None = None
    dw: DwDecisions | None = None
    allreduce: AllReduceDecisions | None = None
    step_fingerprint: str = ""
    """Fingerprint of the step graph the order decisions name nodes of."""
    predicted: dict = field(default_factory=dict)
    chosen: str = ""

    def to_json(self) -> dict:
        return {
            "partition": None if self.partition is None else self.partition.to_json(),
            "dw": None if self.dw is None else self.dw.to_json(),
            "allreduce": None if self.allreduce is None else self.allreduce.to_json(),
            "step_fingerprint": self.step_fingerprint,
            "predicted": self.predicted,
            "chosen": self.chosen,
        }

    @classmethod
    def from_json(cls, data: dict) -> VariantPlan:
        return cls(
            partition=None if data.get("partition") is None else PartitionDecisions.from_json(data["partition"]),
            dw=None if data.get("dw") is None else DwDecisions.from_json(data["dw"]),
            allreduce=None if data.get("allreduce") is None else AllReduceDecisions.from_json(data["allreduce"]),
            step_fingerprint=data.get("step_fingerprint", ""),
            predicted=data.get("predicted", {}),
            chosen=data.get("chosen", ""),
        )

    @property
    def partitioned(self) -> bool:
        return self.partition is not None and any(r.parts > 1 for r in self.partition.regions)


@dataclass(slots=True)
class Plan:
    identity: RunIdentity
    fingerprint: str
    """Fingerprint of the captured step graph (unpartitioned)."""
    forward_fingerprint: str = ""
    """Fingerprint of the captured forward graph (what partitions name nodes of)."""
    variants: dict[str, VariantPlan] = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)
    """Simulated timeline summary of the captured order."""
    options: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    drop_semantics: str = ""
    """How the partitioned MoE layers drop tokens (``lancet.passes.partition.rewrite.drop_semantics``):
    ``micro-batch`` (padded dispatch: each part with its own capacity) or ``whole-batch`` (ragged: the
    drops of the unpartitioned step)."""

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "drop_semantics": self.drop_semantics,
            "forward_fingerprint": self.forward_fingerprint,
            "options": self.options,
            "predicted": self.predicted,
            "selection": self.selection,
            "variants": {name: v.to_json() for name, v in self.variants.items()},
        }

    @classmethod
    def from_document(cls, document: dict) -> Plan:
        return cls(
            identity=identity_from_json(document["identity"]),
            fingerprint=document["fingerprint"],
            forward_fingerprint=document.get("forward_fingerprint", ""),
            variants={k: VariantPlan.from_json(v) for k, v in document["variants"].items()},
            predicted=document.get("predicted", {}),
            options=document.get("options", {}),
            selection=document.get("selection", {}),
            drop_semantics=document.get("drop_semantics", ""),
        )

    def write(self, path: str) -> None:
        write_artifact(path, "plan", self.identity, self.to_json())

    def variant(self, name: str) -> VariantPlan:
        if name not in self.variants:
            raise PlanMismatch(f"the plan has no variant {name!r} (it has {', '.join(self.variants)})")
        return self.variants[name]


@dataclass(slots=True)
class OrderChoice:
    dw: DwDecisions | None
    allreduce: AllReduceDecisions | None
    name: str
    timeline: Timeline
    candidates: dict[str, dict]


def choose_order(
    train_graph: TrainGraph, costs: NodeCosts, *, schedule_dw: bool = True, memory_cap_bytes: int | None = None
) -> tuple[OrderChoice, Timeline]:
    """Simulate every pipeline of ``lancet.plan.pipelines.ORDER_PIPELINES``; apply the fastest to
    ``train_graph`` (in place).

    Returns the choice and the timeline of the order the graph came in. Ties go
    to the pipeline listed first (fewer passes).
    """
    graph = train_graph.graph
    original = list(graph.nodes)
    before = simulate(graph, costs)
    passes = order_passes(memory_cap_bytes=memory_cap_bytes)
    found = []
    # A pipeline that extends one already run (dw+allreduce after dw) continues from that one's order.
    done: dict[tuple[str, ...], tuple[list[fx.Node], dict]] = {(): (original, {})}
    for name, names in order_pipelines(schedule_dw=schedule_dw).items():
        prefix = max((p for p in done if names[: len(p)] == p), key=len)
        order, decisions = done[prefix]
        apply_order(graph, order)
        result = run_passes(train_graph, [passes[n] for n in names[len(prefix):]], lambda _: costs)
        decisions = {**decisions, **result.decisions}
        done[names] = (list(graph.nodes), decisions)
        timeline = simulate(graph, costs) if names else before
        found.append(OrderChoice(decisions.get(DW), decisions.get(ALLREDUCE_GAPS), name, timeline, {}))
    apply_order(graph, original)
    train_graph.gm.recompile()
    best = min(found, key=lambda c: c.timeline.makespan_ms)
    best.candidates = {c.name: c.timeline.summary() for c in found}
    apply_order_decisions(train_graph, best.dw, best.allreduce)
    return best, before


def apply_order_decisions(
    train_graph: TrainGraph, dw: DwDecisions | None, allreduce: AllReduceDecisions | None
) -> TrainGraph:
    if dw is not None:
        apply_dw_decisions(train_graph, dw)
    if allreduce is not None:
        apply_allreduce_decisions(train_graph, allreduce)
    return train_graph


def capture_partitioned_step(
    train_step: TrainStep, partitioned: ForwardGraph, tokens: torch.Tensor, targets: torch.Tensor
) -> TrainGraph:
    """The whole step of a partitioned forward, its backward all-to-alls issued early and awaited late."""
    train_graph = capture_step_from_forward(train_step, partitioned, tokens, targets)
    passes = order_passes()
    return run_passes(train_graph, [passes[name] for name in PARTITIONED_STEP]).graph


def _check(fingerprint: str, expected: str, what: str) -> None:
    if fingerprint != expected:
        raise PlanMismatch(
            f"plan was made from {what} {expected}, this capture is {fingerprint}: "
            "re-profile and re-optimize for this model, gate, world size, dtype and torch"
        )


def build_step_graph(
    train_step: TrainStep, tokens: torch.Tensor, targets: torch.Tensor, plan: Plan, variant: str = "lancet"
) -> TrainGraph:
    """Capture the step as ``variant`` of ``plan`` prescribes (partition, then order decisions)."""
    chosen = plan.variant(variant)
    if chosen.partitioned:
        forward = capture_forward(train_step, tokens, targets)
        _check(graph_fingerprint(forward.graph), plan.forward_fingerprint, "forward graph")
        partitioned = partition_pass(forward, chosen.partition, tokens.shape[0])
        train_graph = capture_partitioned_step(train_step, partitioned, tokens, targets)
    else:
        train_graph = capture_step(train_step, tokens, targets)
        _check(graph_fingerprint(train_graph.graph), plan.fingerprint, "step graph")
    _check(graph_fingerprint(train_graph.graph), chosen.step_fingerprint, f"{variant} step graph")
    return apply_order_decisions(train_graph, chosen.dw, chosen.allreduce)


def load_plan(path: str, expected: RunIdentity | None = None) -> Plan:
    """Read and check a plan file (``ArtifactError`` when unusable, ``ArtifactMismatch`` for another run)."""
    document = read_artifact(path, "plan", expected)
    try:
        return Plan.from_document(document)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ArtifactError(f"plan {path} is malformed ({type(err).__name__}: {err}); make it again") from None


def plan_runner_graph(session, path: str, variant: str = "lancet") -> TrainGraph:
    """Load the plan at ``path``, check it was made for ``session``'s run, capture ``variant`` of it."""
    plan = load_plan(path, session.identity)
    return build_step_graph(session.train_step, *session.batch(0), plan, variant)


def tutel_graph(train_step, tokens: torch.Tensor, targets: torch.Tensor, parts: int):
    """The step with each MoE layer's dispatch stage (all-to-alls and experts) pipelined in ``parts`` parts."""
    from lancet.passes.partition.rewrite import Region
    from lancet.passes.partition.select import dispatch_ranges

    if parts == 1:
        return capture_step(train_step, tokens, targets)
    forward = capture_forward(train_step, tokens, targets)
    regions = [Region(start, end, parts) for start, end in dispatch_ranges(forward.graph)]
    partitioned = partition_pass(forward, PartitionDecisions(regions), tokens.shape[0])
    return capture_partitioned_step(train_step, partitioned, tokens, targets)
