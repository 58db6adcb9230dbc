"""Long-run equivalence: eager, captured, a dW plan and a partition plan trained side by side for many steps.

    python -m lancet.app.equivalence --model tiny --data stdlib --steps 200 --nproc 2 --json equivalence.json

Every variant starts from the same parameters and sees the same batches; each
trains ``--steps`` steps with its own optimizer. The plans are made here, on the
real capture, so no profile is needed: ``dw`` is the order plan the simulator
picks under a toy cost model in which all-to-alls are slow (so dW nodes move
into their windows), ``partition`` splits the widest range around each MoE
layer (from its block's attention to the next block's attention) into
``--parts`` parts, with the partitioned backward's collectives issued early.

The numerics contract checked (fp32):
- captured == eager and dw == captured, bitwise, every step (loss and dropped tokens);
- partition vs captured: the same dropped tokens every step while the curves
  stay together, and loss within a relative tolerance, reported per step (its
  maximum over the run is what the run measured).
Exit status 1 when a bitwise check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

VARIANTS = ("eager", "captured", "dw", "partition")
REFERENCE = {"captured": "eager", "dw": "captured", "partition": "captured"}
BITWISE = ("captured", "dw")


@dataclass(slots=True)
class Curve:
    loss: list[float] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    """Token choices dropped on all ranks, per step."""


def reference_plan(train_step, tokens: torch.Tensor, targets: torch.Tensor, identity, parts: int):
    """A plan with a ``lancet-dw`` order variant and a ``lancet-part`` partition variant (see the module docstring)."""
    from lancet.capture.trace import capture_forward, capture_step
    from lancet.cost.model import ToyCostModel
    from lancet.cost.profile import graph_fingerprint
    from lancet.passes.partition.rewrite import PartitionDecisions, Region, partition_pass
    from lancet.passes.partition.select import candidate_ranges
    from lancet.plan.plan import Plan, VariantPlan, capture_partitioned_step, choose_order

    captured = capture_step(train_step, tokens, targets)
    fingerprint = graph_fingerprint(captured.graph)
    costs = ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5, "all_reduce": 0.2}).costs(captured.graph)
    order, _ = choose_order(captured, costs)
    plan = Plan(identity=identity, fingerprint=fingerprint)
    plan.variants["lancet-dw"] = VariantPlan(dw=order.dw, allreduce=order.allreduce, step_fingerprint=fingerprint,
                                             chosen=order.name)
    forward = capture_forward(train_step, tokens, targets)
    plan.forward_fingerprint = graph_fingerprint(forward.graph)
    decisions = PartitionDecisions([Region(s, e, parts) for s, e in widest_ranges(forward, tokens.shape[0])])
    partitioned = capture_partitioned_step(train_step, partition_pass(forward, decisions, tokens.shape[0]), tokens,
                                           targets)
    plan.variants["lancet-part"] = VariantPlan(partition=decisions, step_fingerprint=graph_fingerprint(partitioned.graph))
    return plan


def widest_ranges(forward, batch_size: int) -> list[tuple[str, str]]:
    """Non-overlapping candidate ranges, earliest start first, each the latest-ending one for its start."""
    from lancet.passes.partition.select import candidate_ranges

    position = {n.name: i for i, n in enumerate(forward.graph.nodes)}
    chosen: list[tuple[str, str]] = []
    for start, end in sorted(candidate_ranges(forward, batch_size), key=lambda r: (position[r[0]], -position[r[1]])):
        if not chosen or position[start] > position[chosen[-1][1]]:
            chosen.append((start, end))
    return chosen


def _runner(variant: str, session, plan):
    from lancet.capture.trace import capture_step
    from lancet.plan.plan import build_step_graph
    from lancet.runtime.captured import CapturedStep

    batch = session.batch(0)
    if variant == "eager":
        return session.train_step
    if variant == "captured":
        return CapturedStep(capture_step(session.train_step, *batch))
    return CapturedStep(build_step_graph(session.train_step, *batch, plan, {"dw": "lancet-dw"}.get(variant, "lancet-part")))


def _train(variant: str, session, plan, initial: list[torch.Tensor], run, steps: int) -> Curve:
    from lancet.app.train import make_optimizer

    with torch.no_grad():
        for p, v in zip(session.params, initial):
            p.copy_(v)
    session.optimizer = make_optimizer(run.optimizer, session.params, run.learning_rate)
    runner = _runner(variant, session, plan)
    curve = Curve()
    for step in range(steps):
        result = runner(session.params, *session.batch(step))
        kept = torch.stack([k.sum() for k in result.keep]).sum().float()
        total = float(sum(k.numel() for k in result.keep))
        summed = torch.stack([result.loss.detach().float(), total - kept]).to(session.runtime.device)
        dist.all_reduce(summed, group=session.runtime.group)
        loss, dropped = summed.tolist()
        curve.loss.append(loss / session.runtime.world_size)
        curve.dropped.append(round(dropped))
        session.apply(result)
    return curve


def train_variants(run, runtime, steps: int, parts: int) -> dict:
    """Every variant's curve (the same on every rank), the plan's dW moves and partition regions."""
    from lancet.app.train import build_session

    session = build_session(run, runtime)
    plan = reference_plan(session.train_step, *session.batch(0), session.identity, parts)
    initial = [p.detach().clone() for p in session.params]
    curves = {v: _train(v, session, plan, initial, run, steps) for v in VARIANTS}
    dw = plan.variants["lancet-dw"].dw
    regions = [r.to_json() for r in plan.variants["lancet-part"].partition.regions]
    return {"steps": steps, "dw_nodes_moved": dw.num_moved if dw else 0, "partition_regions": regions,
            "curves": {v: {"loss": c.loss, "dropped": c.dropped} for v, c in curves.items()}}


def equivalence_worker(run, steps: int, parts: int) -> dict:
    """The rank job of ``main``: ``train_variants`` on a fresh process group."""
    from lancet.runtime.dist import rank_runtime

    with rank_runtime(run.network, run.collective_timeout) as runtime:
        return train_variants(run, runtime, steps, parts)


def compare(curves: dict[str, dict]) -> dict[str, dict]:
    """Per variant against its reference: bitwise equality, max relative loss difference, first step that differs,
    and the steps whose dropped-token counts differ."""
    report = {}
    for variant, reference in REFERENCE.items():
        a, b = curves[variant], curves[reference]
        rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["loss"], b["loss"])]
        differing = [i for i, r in enumerate(rel) if r > 0]
        dropped_differ = [i for i, (x, y) in enumerate(zip(a["dropped"], b["dropped"])) if x != y]
        report[variant] = {
            "reference": reference,
            "bitwise": not differing and not dropped_differ,
            "max_rel_loss_diff": max(rel, default=0.0),
            "max_rel_loss_diff_first_10": max(rel[:10], default=0.0),
            "first_differing_step": differing[0] if differing else None,
            "dropped_differ_steps": len(dropped_differ),
            "first_dropped_differ_step": dropped_differ[0] if dropped_differ else None,
        }
    return report


def main(argv: list[str] | None = None) -> int:
    from lancet.app.cli import UsageError, add_run_args, checked, run_config
    from lancet.runtime.dist import RankFailed, launch

    parser = argparse.ArgumentParser(prog="python -m lancet.app.equivalence", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(parser)
    parser.add_argument("--parts", type=int, default=2, help="parts of each partitioned range")
    parser.add_argument("--json", default=None, help="write the curves and the comparison here")
    # The ragged dispatch keeps whole-batch drop semantics under partitioning, which is what "the same run" means;
    # padded partitions route each part as a micro-batch (another, equally valid run: its drops differ).
    parser.set_defaults(model="tiny", data="stdlib", steps=200, dispatch="ragged")
    args = parser.parse_args(argv)
    try:
        run = checked(run_config(args), (args.json, "--json"))
        if run.dtype != "fp32":
            raise UsageError("the numerics contract is stated for fp32")
        result = launch(equivalence_worker, (run, run.steps, args.parts), run.nproc)
    except (UsageError, RankFailed) as err:
        print(f"equivalence: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    result["comparison"] = compare(result["curves"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": run.to_dict(), **result}, f, indent=1)
    print(f"{run.steps} steps, {run.spec.model}, data {run.data}; dW plan moved {result['dw_nodes_moved']} nodes; "
          f"partition regions {result['partition_regions']}")
    for variant, row in result["comparison"].items():
        print(f"{variant:>9} vs {row['reference']:<8} bitwise={row['bitwise']!s:<5} max rel loss diff "
              f"{row['max_rel_loss_diff']:.3g} (first 10 steps {row['max_rel_loss_diff_first_10']:.3g}), first "
              f"differing step {row['first_differing_step']}, steps with other dropped counts "
              f"{row['dropped_differ_steps']} (first {row['first_dropped_differ_step']})")
    return 0 if all(result["comparison"][v]["bitwise"] for v in BITWISE) else 1


if __name__ == "__main__":
    sys.exit(main())
