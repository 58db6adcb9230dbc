"""Check the derived cost estimate of a partitioned step against a measured profile of that step.

    python -m lancet.app.estimate_check --profile PROFILE --tutel-profile PROFILE_DN --comm COMM

``PROFILE`` is ``lancet profile`` of the captured step, ``PROFILE_DN`` of the
same run with ``--tutel N``. The tutel-dN step is rebuilt here (fake process
group, as ``lancet optimize`` does), priced by ``DerivedCostModel`` from
``PROFILE`` alone, and compared node by node with what ``PROFILE_DN``
measured: totals per phase, simulated steps, and the ops whose estimate is
furthest off.
"""

from __future__ import annotations

import argparse
import collections

from rich.console import Console
from rich.table import Table

from lancet.plan.artifact import ArtifactMismatch, identity_from_json, read_artifact
from lancet.capture.trace import capture_step
from lancet.cost.comm import CommProfile
from lancet.cost.estimate import DerivedCostModel
from lancet.cost.model import ProfiledCostModel
from lancet.cost.profile import graph_fingerprint
from lancet.app.profile_job import step_for_profile
from lancet.plan.optimize import fake_process_group, profile_for_network
from lancet.sim.simulator import simulate
from lancet.graph import meta


def _by(graph, costs, key) -> collections.Counter:
    totals: collections.Counter = collections.Counter()
    for node in graph.nodes:
        totals[key(node)] += costs.compute(node)
    return totals


def check(profile_path: str, tutel_path: str, comm_path: str, console: Console, top: int = 15) -> dict:
    from lancet.plan.plan import tutel_graph

    base_doc, part_doc = read_artifact(profile_path, "profile"), read_artifact(tutel_path, "profile")
    parts = part_doc.get("tutel_parts", 1)
    if base_doc.get("tutel_parts", 1) != 1 or parts == 1:
        raise ArtifactMismatch("give the captured step's profile and a `lancet profile --tutel N` profile (N > 1)")
    comm_doc = read_artifact(comm_path, "comm")
    network = identity_from_json(comm_doc["identity"]).network
    base, measured = profile_for_network(base_doc, network), profile_for_network(part_doc, network)
    comm = CommProfile.from_json(comm_doc["comm"])
    model_host = base_doc["identity"]["device"].startswith("cuda")
    with fake_process_group(base_doc["identity"]["world_size"]):
        step, tokens, targets = step_for_profile(base_doc)
        captured = capture_step(step, tokens, targets)
        graph = tutel_graph(step, tokens, targets, parts).graph
        if graph_fingerprint(graph) != measured.fingerprint:
            raise ArtifactMismatch("the tutel step rebuilt here is not the profiled one")
        derived = DerivedCostModel.of_captured(base, comm, captured.graph, model_host)
        estimate = derived.costs(graph)
        truth = ProfiledCostModel(measured, comm, model_host=model_host).costs(graph)
        phase = lambda n: meta.get(n, meta.PHASE, "other")  # noqa: E731
        op = lambda n: f"{phase(n)} {n.target}"  # noqa: E731
        result = {
            "parts": parts,
            "step_ms": {"estimate": simulate(graph, estimate).makespan_ms, "measured": simulate(graph, truth).makespan_ms},
            "phase_ms": {"estimate": dict(_by(graph, estimate, phase)), "measured": dict(_by(graph, truth, phase))},
        }
        est_ops, true_ops = _by(graph, estimate, op), _by(graph, truth, op)
    table = Table(title=f"derived estimate vs measured, tutel-d{parts} step (simulated step: "
                        f"{result['step_ms']['estimate']:.1f} vs {result['step_ms']['measured']:.1f} ms)")
    for column in ("phase op", "estimate ms", "measured ms", "difference"):
        table.add_column(column, justify="right")
    worst = sorted(set(est_ops) | set(true_ops), key=lambda k: -abs(est_ops[k] - true_ops[k]))[:top]
    for key in worst:
        table.add_row(key, f"{est_ops[key]:.2f}", f"{true_ops[key]:.2f}", f"{est_ops[key] - true_ops[key]:+.2f}")
    for name in sorted(result["phase_ms"]["measured"]):
        table.add_row(f"[bold]{name} total", f"{result['phase_ms']['estimate'].get(name, 0):.2f}",
                      f"{result['phase_ms']['measured'][name]:.2f}", "")
    console.print(table)
    result["worst_ops"] = {k: [est_ops[k], true_ops[k]] for k in worst}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lancet.app.estimate_check", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True, help="profile of the captured step")
    parser.add_argument("--tutel-profile", required=True, help="profile of the tutel-dN step (lancet profile --tutel N)")
    parser.add_argument("--comm", required=True)
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args(argv)
    result = check(args.profile, args.tutel_profile, args.comm, Console(width=160))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
