"""The captured whole-step graph reproduces the eager step bit for bit (fp32, CPU, gloo)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lancet.capture.trace import CaptureError, capture_step
from lancet.app.data import BatchSource
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.captured import CapturedStep
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

GATES = [  # ragged: new split sizes every step (the padded capture: test_padded_dispatch.py)
    GateConfig(kind="switch", dispatch="ragged"),
    GateConfig(kind="batch_prioritized", dispatch="ragged"),
    GateConfig(kind="topk", topk=2),
]


def _build(group, gate: GateConfig, world: int | None = None):
    cfg = model_config("gpt2_moe_nl2_m32_nh2_sl8_b3", vocab_size=97, gate=gate)
    model = build_model(cfg, group, seed=2, world_size=world)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=5)
    return model, TrainStep(model, group), source


def _bitwise_rank(group, gates: list[GateConfig], steps: int) -> list[list[int]]:
    rank = group.rank()
    splits_seen = []
    for gate in gates:
        model, eager, source = _build(group, gate)
        captured = CapturedStep(capture_step(eager, *source.batch(0, rank)))
        params = eager.parameters()
        kept_counts = []
        for s in range(steps):
            batch = source.batch(s, rank)
            want = eager(params, *batch)
            got = captured(params, *batch)
            assert torch.equal(got.loss, want.loss), f"{gate.kind} step {s}: loss differs"
            for name, g, w in zip(eager.param_names, got.grads, want.grads):
                assert torch.equal(g, w), f"{gate.kind} step {s}: gradient of {name} differs"
            for g, w in zip(got.keep, want.keep):
                assert torch.equal(g, w)
            kept_counts.append(int(sum(k.sum() for k in want.keep)))
            # Move the parameters so the next step routes differently.
            with torch.no_grad():
                for p, g in zip(params, want.grads):
                    p.sub_(0.5 * g)
        splits_seen.append(kept_counts)
    return splits_seen


def test_captured_graph_is_bitwise_equal_to_eager():
    results = run_ranks(_bitwise_rank, 2, GATES, 3)
    # Routing really changed between steps on some rank (new split sizes were exercised).
    assert any(len(set(counts)) > 1 for per_rank in results for counts in per_rank[:2])


class _ValueDependentMLP(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:  # Python branch on a tensor value: not capturable
            return self.inner(x)
        return x


def test_untraceable_model_names_op_and_module():
    model, step, source = _build(None, GateConfig(kind="switch"), world=1)
    model.blocks[1].mlp = _ValueDependentMLP(model.blocks[1].mlp)
    step = TrainStep(model, None)
    with pytest.raises(CaptureError) as info:
        capture_step(step, *source.batch(0, 0))
    message = str(info.value)
    assert "module 'blocks.1.mlp' (_ValueDependentMLP)" in message
    assert "op: TensorBase.__bool__" in message
    assert "if x.sum() > 0" in message
    assert "torch/" not in message.split("at ", 1)[1].splitlines()[0]
