"""The plan: what the passes decided, as a file re-applied to a fresh capture on every rank.

A plan holds the fingerprint of the captured graph it was made from and the
decisions of each pass, by node name. Applying it to a capture with another
fingerprint (another model, gate, world size, device or torch) is refused:
every rank applies the same decisions to the same graph, so every rank issues
collectives in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lancet.artifact import RunIdentity, identity_from_json, read_artifact, write_artifact
from lancet.capture import TrainGraph
from lancet.cost.model import NodeCosts
from lancet.cost.profile import graph_fingerprint
from lancet.graph.reorder import apply_order
from lancet.passes.allreduce_gaps import AllReduceDecisions, allreduce_gaps_pass, apply_allreduce_decisions
from lancet.passes.dw import DwDecisions, apply_dw_decisions, dw_pass
from lancet.sim import Timeline, simulate


class PlanMismatch(ValueError):
    """The plan was made from a different graph."""


@dataclass(slots=True)
class Plan:
    identity: RunIdentity
    fingerprint: str
    dw: DwDecisions | None = None
    allreduce: AllReduceDecisions | None = None
    predicted: dict[str, dict] = field(default_factory=dict)
    """Simulated timeline summaries: before (captured order) and after (this plan)."""
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "options": self.options,
            "passes": {
                "dw": None if self.dw is None else self.dw.to_json(),
                "allreduce": None if self.allreduce is None else self.allreduce.to_json(),
            },
            "predicted": self.predicted,
        }

    @classmethod
    def from_document(cls, document: dict) -> Plan:
        passes = document["passes"]
        return cls(
            identity=identity_from_json(document["identity"]),
            fingerprint=document["fingerprint"],
            dw=None if passes.get("dw") is None else DwDecisions.from_json(passes["dw"]),
            allreduce=None if passes.get("allreduce") is None else AllReduceDecisions.from_json(passes["allreduce"]),
            predicted=document.get("predicted", {}),
            options=document.get("options", {}),
        )

    def write(self, path: str) -> None:
        write_artifact(path, "plan", self.identity, self.to_json())


@dataclass(slots=True)
class _Candidate:
    name: str
    dw: DwDecisions | None
    allreduce: AllReduceDecisions | None
    timeline: Timeline


def _candidates(train_graph: TrainGraph, costs: NodeCosts, schedule_dw: bool, memory_cap_bytes: int | None):
    """Every combination of the order-only passes, each simulated from the captured order."""
    graph = train_graph.graph
    original = list(graph.nodes)
    found = [_Candidate("captured", None, None, simulate(graph, costs))]
    _, allreduce = allreduce_gaps_pass(train_graph, costs)
    found.append(_Candidate("allreduce", None, allreduce, simulate(graph, costs)))
    apply_order(graph, original)
    if schedule_dw:
        _, dw = dw_pass(train_graph, costs, memory_cap_bytes=memory_cap_bytes)
        found.append(_Candidate("dw", dw, None, simulate(graph, costs)))
        _, allreduce = allreduce_gaps_pass(train_graph, costs)
        found.append(_Candidate("dw+allreduce", dw, allreduce, simulate(graph, costs)))
        apply_order(graph, original)
    train_graph.gm.recompile()
    return found


def make_plan(
    train_graph: TrainGraph,
    costs: NodeCosts,
    identity: RunIdentity,
    *,
    schedule_dw: bool = True,
    memory_cap_bytes: int | None = None,
) -> tuple[Plan, Timeline, Timeline]:
    """Simulate every combination of the passes, keep the fastest, apply it to ``train_graph`` (in place).

    Returns the plan with the timelines of the captured order and of the plan.
    Ties go to the candidate with fewer passes (listed first).
    """
    fingerprint = graph_fingerprint(train_graph.graph)
    found = _candidates(train_graph, costs, schedule_dw, memory_cap_bytes)
    best = min(found, key=lambda c: c.timeline.makespan_ms)
    plan = Plan(
        identity=identity,
        fingerprint=fingerprint,
        dw=best.dw,
        allreduce=best.allreduce,
        options={"dw": schedule_dw, "memory_cap_bytes": memory_cap_bytes, "chosen": best.name},
    )
    apply_plan(train_graph, plan)
    plan.predicted = {
        "before": found[0].timeline.summary(),
        "after": best.timeline.summary(),
        "candidates": {c.name: c.timeline.summary() for c in found},
    }
    return plan, found[0].timeline, best.timeline


def apply_plan(train_graph: TrainGraph, plan: Plan) -> TrainGraph:
    """Re-apply ``plan``'s decisions to a fresh capture (in place)."""
    fingerprint = graph_fingerprint(train_graph.graph)
    if fingerprint != plan.fingerprint:
        raise PlanMismatch(
            f"plan was made from graph {plan.fingerprint}, this capture is {fingerprint}: "
            "re-profile and re-optimize for this model, gate, world size, dtype and torch"
        )
    if plan.dw is not None:
        apply_dw_decisions(train_graph, plan.dw)
    if plan.allreduce is not None:
        apply_allreduce_decisions(train_graph, plan.allreduce)
    return train_graph


def load_plan(path: str, expected: RunIdentity | None = None) -> Plan:
    return Plan.from_document(read_artifact(path, "plan", expected))


def apply_plan_file(train_graph: TrainGraph, path: str, session) -> TrainGraph:
    """Load the plan at ``path``, check it was made for ``session``'s run, apply it."""
    return apply_plan(train_graph, load_plan(path, session.identity))
