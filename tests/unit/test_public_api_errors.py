"""The public API refuses what would train wrongly: expert-local parameters on the wrong side, in-place c10d
collectives, a ``--model`` factory that cannot be loaded. Traced on a fake 2-rank group (nothing communicates)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lancet
from examples.mixtral_style import Config, factory
from lancet.models.factory import ModelFactoryError, build_bundle
from lancet.plan.optimize import fake_process_group

CFG = Config(layers=1, dim=16, hidden=16, vocab=32, batch=2, seq=4)
EXPERTS = {"blocks.0.moe.w_gate", "blocks.0.moe.w_up", "blocks.0.moe.w_down"}


def _step(group, **options):
    bundle = factory(group, torch.device("cpu"), CFG)
    optimizer = torch.optim.SGD(bundle.model.parameters(), lr=0.1)
    return lancet.Step(bundle.model, bundle.loss_fn, optimizer, group=group, **options), bundle.batch(0, 0)


def test_expert_params_are_found_from_the_graph():
    with fake_process_group(2) as group:
        step, batch = _step(group)
        lancet.capture_step(step, batch)
        # The router and the shared expert get their gradients without crossing an all-to-all.
        assert step.expert_params == EXPERTS


def test_expert_param_missing_is_named():
    with fake_process_group(2) as group:
        step, batch = _step(group, expert_params=EXPERTS - {"blocks.0.moe.w_down"})
        with pytest.raises(lancet.ExpertParamError, match=r"blocks\.0\.moe\.w_down .*treated as data-parallel"):
            lancet.capture_step(step, batch)


def test_dense_param_declared_expert_is_named():
    with fake_process_group(2) as group:
        bundle = factory(group, torch.device("cpu"), CFG)
        moe = bundle.model.blocks[0].moe
        declared = [moe.w_gate, moe.w_up, moe.w_down, moe.router.weight]  # parameters, not names
        step = lancet.Step(bundle.model, bundle.loss_fn, torch.optim.SGD(bundle.model.parameters(), lr=0.1),
                           group=group, expert_params=declared)
        with pytest.raises(lancet.ExpertParamError, match=r"blocks\.0\.moe\.router\.weight are declared expert-local"):
            lancet.capture_step(step, bundle.batch(0, 0))


def test_expert_param_that_is_no_parameter():
    with fake_process_group(2) as group:
        with pytest.raises(ValueError, match="blocks.0.moe.nothing is not a parameter"):
            _step(group, expert_params=["blocks.0.moe.nothing"])


class _InPlace(nn.Module):
    def __init__(self, group, collective: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.group, self.collective = group, collective

    def forward(self, x):
        y = self.lin(x)
        if self.collective == "all_reduce":
            dist.all_reduce(y, group=self.group)
            return y
        out = torch.empty_like(y)
        dist.all_to_all_single(out, y, group=self.group)
        return out


@pytest.mark.parametrize("collective, op", [("all_reduce", "allreduce_"), ("all_to_all", "alltoall_base_")])
def test_inplace_collective_is_refused(collective, op):
    with fake_process_group(2) as group:
        model = _InPlace(group, collective)
        mse = lambda out, target: ((out - target) ** 2).mean()  # noqa: E731
        step = lancet.Step(model, mse, torch.optim.SGD(model.parameters(), lr=0.1), group=group, expert_params=[])
        expected = rf"in module '<model>'(.|\n)*op: c10d\.{op}(.|\n)*dist\.all(.|\n)*_functional_collectives\."
        with pytest.raises(lancet.CaptureError, match=expected):
            lancet.capture_step(step, (torch.randn(2, 4), torch.randn(2, 4)))


def not_a_bundle(group, device) -> dict:
    return {"model": nn.Linear(2, 2)}


def test_factory_errors():
    with pytest.raises(ModelFactoryError, match="cannot import 'no_such_package_xyz.models' .No module named"):
        build_bundle("no_such_package_xyz.models:make", None, torch.device("cpu"))
    with pytest.raises(ModelFactoryError, match="has no callable 'nothing'"):
        build_bundle("examples.mixtral_style:nothing", None, torch.device("cpu"))
    with pytest.raises(ModelFactoryError, match="returned dict; a factory returns lancet.ModelBundle"):
        build_bundle(f"{__name__}:not_a_bundle", None, torch.device("cpu"))
    with pytest.raises(ModelFactoryError, match="expected package.module:factory"):
        build_bundle("examples.mixtral_style:", None, torch.device("cpu"))


def test_targets_of_another_shape_than_the_inputs_run_and_a_new_batch_shape_is_refused():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)  # a classifier: inputs [B, 4], targets [B]
    step = lancet.Step(model, nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    for executor in ("interpret", "compiled"):
        runner = lancet.Runner(step, executor=executor)
        assert torch.isfinite(runner.step(batch))
        with pytest.raises(ValueError, match=r"shapes \(6, 4\) \(inputs\) and \(6,\) \(targets\) given to a graph "
                                             r"captured for \(5, 4\) and \(5,\)"):
            runner.step((torch.randn(6, 4), torch.randint(0, 3, (6,))))
