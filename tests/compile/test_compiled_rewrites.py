"""Rewrites that only take effect in compiled regions, compiled with Inductor on the CPU (seconds each): the
padded dispatch's inlined ops (batch_prioritized: a stable sort, or sorted runs, inside a region) and the
batched parameter casts (a foreach copy)."""

from __future__ import annotations

import pytest
import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.moe.priority_positions import ENV, METHODS
from lancet.runtime.captured import CapturedStep
from lancet.runtime.executor import make_executor
from lancet.step.train_step import TrainStep
from tests.unit.test_param_casts import _bf16_step


@pytest.mark.parametrize("positions", METHODS)
def test_batch_prioritized_step_compiled_with_inlined_ops_equals_the_graph(positions, monkeypatch):
    monkeypatch.setenv(ENV, positions)  # sort, or sorted runs (lancet::runs_below inside the region)
    cfg = model_config("gpt2_moe_nl1_m16_nh2_sl8_b2", vocab_size=97,
                       gate=GateConfig(kind="batch_prioritized", capacity_factor=0.5))
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg, None, world_size=1), None)
    batch = BatchSource(batch_size=2, seq_len=8, vocab_size=97, seed=3).batch(0, 0)
    graph = capture_step(step, *batch)
    params = step.parameters()
    want, got = CapturedStep(graph)(params, *batch), make_executor(graph, "compiled")(params, *batch)
    assert torch.allclose(got.loss, want.loss, rtol=1e-5)
    for g, w in zip(got.grads, want.grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(g, w) for g, w in zip(got.keep, want.keep))  # the same dropped tokens
    assert any(not k.all() for k in want.keep)  # capacity 0.5 drops some


def test_the_compiled_executor_runs_the_batched_casts():
    step, batch = _bf16_step(layers=1)
    graph = capture_step(step, *batch)
    assert any(n.target is torch.ops.aten._foreach_copy.default for n in graph.graph.nodes)
    params = step.parameters()
    want = CapturedStep(graph)(params, *batch)
    got = make_executor(graph, "compiled")(params, *batch)
    # bf16 arithmetic that Inductor fuses and reorders: equal to rounding, not bitwise.
    assert torch.allclose(got.loss, want.loss, rtol=2e-2)
