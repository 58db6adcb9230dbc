"""The Mixtral-style example model through the public API only, on 2 gloo ranks in fp32: the captured step and
the dW plan equal eager bitwise; a partition plan whose ranges the search found (no names given) equals eager
within 1e-5 with the same dropped tokens."""

from __future__ import annotations

from dataclasses import replace

import torch

import lancet
from lancet.cost.comm import CommProfile, PiecewiseLinear
from examples.mixtral_style import Config, factory
from tests.distributed import run_ranks

CFG = Config(layers=2, dim=16, hidden=16, vocab=32, batch=4, seq=4)
# fp32; a partitioned range sums expert weight gradients over parts (reassociation), hence a tolerance.
RTOL = 1e-5


def _setup(group):
    bundle = factory(group, torch.device("cpu"), CFG)
    optimizer = torch.optim.SGD(bundle.model.parameters(), lr=0.1)
    step = lancet.Step(bundle.model, bundle.loss_fn, optimizer, group=group, bucket_bytes=4096)
    batches = [bundle.batch(i, group.rank()) for i in range(2)]
    profile = lancet.profile(step, batches, reps=1, warmup=1)
    comm = lancet.profile_comm(group, torch.device("cpu"), sizes=[2**12, 2**16, 2**20], reps=1)
    return step, batches, profile, comm


def _outputs(result) -> list[torch.Tensor]:
    return [result.loss, *result.grads, *result.keep]


def _captured_and_dw(group) -> dict:
    step, batches, profile, comm = _setup(group)
    plan = lancet.optimize(step, batches[0], profile, comm, partition=False)
    eager = lancet.Runner(step, executor="eager")
    captured = lancet.Runner(step, executor="interpret")
    dw = lancet.Runner(step, plan, variant="lancet-dw", executor="interpret")
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(_outputs(a), _outputs(b)))  # noqa: E731
    reference = [eager(b) for b in batches]
    return {
        "captured": [same(captured(b), r) for b, r in zip(batches, reference)],
        "dw": [same(dw(b), r) for b, r in zip(batches, reference)],
        "dw_moved": plan.variants["lancet-dw"].dw.num_moved if plan.variants["lancet-dw"].dw else 0,
        "experts": sorted(step.expert_params),
    }


def test_captured_and_dw_plan_equal_eager_bitwise():
    for rank, found in enumerate(run_ranks(_captured_and_dw, 2)):
        assert found["experts"] == [f"blocks.{i}.moe.{w}" for i in range(2) for w in ("w_down", "w_gate", "w_up")]
        assert found["captured"] == [True, True], f"rank {rank}: captured step differs from eager"
        assert found["dw_moved"] > 0, "the dW plan moved no weight-gradient node: nothing was tested"
        assert found["dw"] == [True, True], f"rank {rank}: dW plan differs from eager"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _bandwidth_bound_wire(comm: CommProfile) -> CommProfile:
    """The measured profile with a wire of 20 ms per KiB and no latency: all-to-all time that a split hides."""
    curve = PiecewiseLinear([(0.0, 0.0), (1024.0, 20.0), (2.0**30, 20.0 * 2**20)])
    return replace(comm, curves={**comm.curves, "all_to_all": curve})


def _partitioned(group) -> dict:
    step, batches, profile, comm = _setup(group)
    plan = lancet.optimize(step, batches[0], profile, _bandwidth_bound_wire(comm), dw=False)
    part = plan.variants["lancet-part"]
    found = {"candidates": plan.selection.get("candidates", []), "partitioned": part.partitioned}
    if not found["partitioned"]:
        return found
    eager = lancet.Runner(step, executor="eager")
    parts = lancet.Runner(step, plan, variant="lancet-part", executor="interpret")
    errors, same_keep = [], []
    for batch in batches:
        want, got = eager(batch), parts(batch)
        errors.append(max(_relative(g, w) for g, w in zip([got.loss, *got.grads], [want.loss, *want.grads])))
        same = len(got.keep) == len(want.keep) and all(torch.equal(g, w) for g, w in zip(got.keep, want.keep))
        same_keep.append(same)
    return {**found, "errors": errors, "same_keep": same_keep}


def test_partition_plan_with_ranges_found_equals_eager():
    for rank, found in enumerate(run_ranks(_partitioned, 2)):
        assert found["candidates"], "the range search found no range to partition around the MoE layers"
        assert found["partitioned"], f"no partition chosen among {found['candidates']}"
        assert max(found["errors"]) < RTOL, f"rank {rank}: partitioned differs from eager by {found['errors']}"
        assert all(found["same_keep"]), f"rank {rank}: the partitioned step drops other tokens"
