"""An emulated rank computes what the contract says: rank 0 of a job whose every peer mirrors rank 0.

Reference: one process holding all experts, expert e tied to rank 0's local expert e mod L, on rank 0's
batch (``tests.emulation.tied_reference``). Checked for every gate, eager and captured.
"""

from __future__ import annotations

import pytest
import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.emulation import EmulationSpec, emulated_runtime
from lancet.runtime.captured import CapturedStep
from lancet.step.train_step import TrainStep
from tests.emulation import tied_reference, toy_regime

GATES = [
    GateConfig(kind="switch"),
    GateConfig(kind="batch_prioritized"),
    GateConfig(kind="topk", topk=2),
    GateConfig(kind="switch", capacity_factor=0.5, aux_loss_coef=0.01),
]
# fp32 parity at the noise floor of reassociated sums (the reference groups experts differently; the
# emulated gradient all-reduce scales W copies of grad(loss / W)).
RTOL, ATOL = 1e-5, 1e-6
SEED = 1


def _config(gate: GateConfig):
    return model_config("gpt2_moe_nl3_m32_nh2_sl8_b3", vocab_size=97, gate=gate)


def _batch(cfg, step: int):
    return BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=3).batch(step, 0)


def _check(result, cfg, world: int, tokens, targets, param_names) -> None:
    loss, keep, expected = tied_reference(cfg, world, tokens, targets, SEED)
    torch.testing.assert_close(result.loss, loss, rtol=RTOL, atol=ATOL)
    for name, grad in zip(param_names, result.grads):
        torch.testing.assert_close(grad, expected[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    for ours, theirs in zip(result.keep, keep):
        assert torch.equal(ours, theirs), "dropped-token sets differ"


@pytest.mark.parametrize("world", [2, 4])
def test_eager_emulated_rank_matches_tied_reference(world):
    with emulated_runtime(EmulationSpec(world_size=world, regime=toy_regime(0.0, 0.0))) as runtime:
        for gate in GATES:
            cfg = _config(gate)
            step = TrainStep(build_model(cfg, runtime.group, seed=SEED), runtime.group)
            tokens, targets = _batch(cfg, 0)
            _check(step(step.parameters(), tokens, targets), cfg, world, tokens, targets, step.param_names)


def test_captured_emulated_rank_matches_tied_reference():
    world = 4
    with emulated_runtime(EmulationSpec(world_size=world, regime=toy_regime(0.0, 0.0))) as runtime:
        cfg = _config(GATES[0])
        step = TrainStep(build_model(cfg, runtime.group, seed=SEED), runtime.group)
        captured = CapturedStep(capture_step(step, *_batch(cfg, 0)))
        for s in range(2):  # a second batch: split sizes come from the data on every replay
            tokens, targets = _batch(cfg, s)
            _check(captured(step.parameters(), tokens, targets), cfg, world, tokens, targets, step.param_names)


def test_switch_drops_tokens_in_this_setup():
    """The keep comparison above is only meaningful if capacity drops tokens."""
    cfg = _config(GATES[0])
    _, keep, _ = tied_reference(cfg, 4, *_batch(cfg, 0), SEED)
    assert not all(bool(k.all()) for k in keep)
