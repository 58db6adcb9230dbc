"""Expert-parallel model (ragged dispatch) == one process holding all experts (loss, every gradient, dropped
tokens). The padded dispatch is checked against an independent dense reference in test_padded_dispatch.py."""

from __future__ import annotations

import pytest
import torch

from lancet.app.data import BatchSource
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.step.train_step import TrainStep, expert_parameter_names
from tests.distributed import run_ranks
from tests.reference import reference_step

GATES = [
    GateConfig(kind="switch", dispatch="ragged"),
    GateConfig(kind="batch_prioritized", dispatch="ragged"),
    GateConfig(kind="topk", topk=1),
    GateConfig(kind="topk", topk=2),
    GateConfig(kind="switch", capacity_factor=0.5, aux_loss_coef=0.01, dispatch="ragged"),
]
# fp32 parity at the noise floor of reassociated sums (ranks sum partial gradients in another order).
RTOL, ATOL = 1e-5, 1e-6


def small_config(gate: GateConfig):
    return model_config("gpt2_moe_nl3_m32_nh2_sl8_b3", vocab_size=97, gate=gate)


def _check_rank(group, gates: list[GateConfig], steps: int) -> int:
    return sum(_check_gate(group, gate, steps) for gate in gates)


def _check_gate(group, gate: GateConfig, steps: int) -> int:
    rank, world = group.rank(), group.size()
    cfg = small_config(gate)
    model = build_model(cfg, group, seed=1)
    step = TrainStep(model, group)
    experts = expert_parameter_names(model)
    local_experts = cfg.total_experts(world) // world
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=3)
    checked = 0
    for s in range(steps):
        result = step(step.parameters(), *source.batch(s, rank))
        shards = [source.batch(s, r) for r in range(world)]
        ref_losses, ref_grads, ref_keeps = reference_step(cfg, world, shards, seed=1)
        torch.testing.assert_close(result.loss, ref_losses[rank], rtol=RTOL, atol=ATOL)
        for name, grad in zip(step.param_names, result.grads):
            expected = ref_grads[name]
            if name in experts:
                expected = expected[rank * local_experts : (rank + 1) * local_experts]
            torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
            checked += 1
        for keep, ref_keep in zip(result.keep, ref_keeps[rank]):
            assert torch.equal(keep, ref_keep), "dropped-token sets differ"
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    checked = run_ranks(_check_rank, world, GATES, 2)
    assert all(c > 0 for c in checked)


def test_switch_drops_tokens_in_this_setup():
    """The comparison above is only meaningful if capacity actually drops tokens."""
    cfg = small_config(GateConfig(kind="switch", dispatch="ragged"))
    model = build_model(cfg, None, world_size=2)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=3)
    result = TrainStep(model, None)(list(model.parameters()), *source.batch(0, 0))
    assert not all(bool(k.all()) for k in result.keep)
