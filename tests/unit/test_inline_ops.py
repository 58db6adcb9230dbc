"""Compiled regions see the padded dispatch's ops as the ATen ops of their implementations, with equal values."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.inline_ops import holds_inlinable_ops, inline_lancet_ops, inline_table
from lancet.runtime.program import build_program
from lancet.step.train_step import TrainStep


def _leaves(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _region_inputs(gate: str) -> dict:
    """Region index -> (module, inputs) of every compiled region of one step of a one-layer model."""
    cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind=gate, capacity_factor=0.5))
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg, None, world_size=1), None)
    tokens, targets = BatchSource(batch_size=4, seq_len=8, vocab_size=97, seed=2).batch(0, 0)
    program = build_program(capture_step(step, tokens, targets))
    seen: dict = {}
    for index, call in program.calls.items():
        def record(*args, index=index, module=call.module):
            seen[index] = (module, args)
            return module(*args)
        call.impl = record
    program(*step.parameters(), tokens, targets)
    return seen


@pytest.mark.parametrize("gate", ["switch", "batch_prioritized"])
def test_regions_trace_the_dispatch_ops_through_their_implementations(gate):
    table = inline_table()
    inlined_ops = set()
    for module, args in _region_inputs(gate).values():
        ops = {node.target for node in module.graph.nodes if node.op == "call_function" and node.target in table}
        inlined = inline_lancet_ops(module, args)
        if not ops:
            assert inlined is module
            continue
        inlined_ops |= ops
        assert not holds_inlinable_ops(inlined)
        want, got = _leaves(module(*args)), _leaves(inlined(*args))
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert torch.equal(w, g)  # the same ATen ops on the same inputs: bitwise
    # The forward's slots, scatter and gather, and the backward's gather and scatter, all went through.
    assert inlined_ops == set(table)

