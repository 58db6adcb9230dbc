"""Training that survives: resume is bitwise (with and without a plan), ranks agree on plan and graph, the
non-finite guard takes one decision on every rank."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from lancet.app.config import ModelSpec, RunConfig
from lancet.app.data import make_batch_source
from lancet.app.equivalence import reference_plan
from lancet.app.agreement import RankDisagreement
from lancet.app.guard import NonFiniteError, StepGuard
from lancet.app.train import _train
from lancet.models import build_model
from lancet.plan.optimize import fake_process_group
from lancet.plan.plan import Plan, VariantPlan
from lancet.runtime.dist import Runtime
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

RUN = RunConfig(spec=ModelSpec(model="tiny"), steps=4, data="stdlib", gc_every=100)


def _runtime(group) -> Runtime:
    return Runtime(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                   device=torch.device("cpu"))


def _plan(run: RunConfig) -> Plan:
    """The reference dW and partition plan for ``run`` on 2 ranks, made as `lancet optimize` makes plans."""
    with fake_process_group(2):
        group = dist.group.WORLD
        cfg = run.spec.model_config()
        step = TrainStep(build_model(cfg, group, seed=run.seed), group)
        source = make_batch_source(run.data, cfg.batch_size, cfg.seq_len, cfg.vocab_size, run.seed)
        return reference_plan(step, *source.batch(0, 0), run.identity(2, torch.device("cpu")), parts=2)


def _losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def _straight_and_resumed(group, runs: list[RunConfig], folder: str) -> list[tuple[list[float], list[float]]]:
    runtime = _runtime(group)
    out = []
    for i, run in enumerate(runs):
        straight = _losses(_train(run, runtime))
        checkpointed = dataclasses.replace(run, checkpoint_dir=f"{folder}/{i}", checkpoint_every=2)
        first = _losses(_train(dataclasses.replace(checkpointed, steps=2), runtime))
        second = _losses(_train(dataclasses.replace(checkpointed, resume=True), runtime))
        out.append((straight, first + second))
    return out


def test_resume_is_bitwise_with_and_without_a_plan(tmp_path):
    plan_path = str(tmp_path / "plan.json")
    _plan(RUN).write(plan_path)
    runs = [RUN, dataclasses.replace(RUN, mode="captured", plan=plan_path, plan_variant="lancet-dw")]
    for rank_view in run_ranks(_straight_and_resumed, 2, runs, str(tmp_path)):
        for straight, resumed in rank_view:
            assert len(straight) == 4 and straight == resumed  # bitwise: == on Python floats


def _guard(group, policy: str):
    rank = dist.get_rank(group)
    guard = StepGuard(["a", "b"], policy, group, torch.device("cpu"))
    grads = [torch.ones(3), torch.full((2,), float("nan") if rank == 1 else 1.0)]
    clean = guard.check(0, torch.tensor(float(rank)), [torch.ones(3), torch.ones(2)], stop_requested=rank == 0)
    try:
        return clean, guard.check(7, torch.tensor(1.0), grads, stop_requested=False)
    except NonFiniteError as err:
        return clean, str(err)


def _guard_then_disagree(group, runs: list[RunConfig]):
    guarded = [_guard(group, policy) for policy in ("skip", "stop")]
    try:
        _train(runs[dist.get_rank(group)], _runtime(group))
    except RankDisagreement as err:
        return guarded, str(err)
    return guarded, None


def test_nonfinite_guard_and_plan_agreement_decide_alike_on_every_rank(tmp_path):
    plan = _plan(RUN)
    plan.write(str(tmp_path / "plan.json"))
    plan.variants["lancet-dw"] = VariantPlan(step_fingerprint=plan.fingerprint)  # the same graph, nothing moved
    plan.write(str(tmp_path / "edited.json"))
    runs = [dataclasses.replace(RUN, mode="captured", plan=str(tmp_path / name), plan_variant="lancet-dw")
            for name in ("plan.json", "edited.json")]
    for (skip, stop), disagreement in run_ranks(_guard_then_disagree, 2, runs):
        clean, bad = skip
        assert clean.loss == 0.5 and clean.stop and not clean.skip
        assert bad.skip and not bad.stop and bad.nonfinite == "non-finite gradient of b at step 7 (rank 1)"
        assert stop[1].startswith("non-finite gradient of b at step 7 (rank 1); stopping")
        assert disagreement.startswith("ranks disagree with rank 0: rank 1 (plan, step graph)")
