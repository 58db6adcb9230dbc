"""MoE layers found from collectives and data flow, for the padded and the ragged dispatch."""

from __future__ import annotations

import pytest

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.graph.analysis import analyze
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.plan.optimize import fake_process_group
from lancet.step.train_step import TrainStep

LAYER = ["dispatch", "combine"]
BACKWARD = ["combine_grad", "dispatch_grad"]


@pytest.mark.parametrize("dispatch", ["padded", "ragged"])
def test_layers_and_purposes_of_both_dispatches(dispatch):
    with fake_process_group(2) as group:
        cfg = model_config("gpt2_moe_nl3_m32_nh2_sl8_b2", vocab_size=97, gate=GateConfig(kind="switch", dispatch=dispatch))
        step = TrainStep(build_model(cfg, group), group, bucket_bytes=8192)
        source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
        analysis = analyze(capture_step(step, *source.batch(0, 0)))
    forward = ["counts", *LAYER] if dispatch == "ragged" else LAYER
    purposes = [c.purpose for c in analysis.collectives_of("all_to_all")]
    assert purposes == forward * 2 + BACKWARD * 2
    assert {c.purpose for c in analysis.collectives_of("all_reduce")} == {"grad_allreduce"}
    layers = analysis.moe_layers
    assert [layer.module for layer in layers] == ["blocks.0.mlp", "blocks.2.mlp"]
    # Backward pairs come in reverse layer order: the last layer's backward runs first.
    backward = [c for c in analysis.collectives_of("all_to_all", "backward")]
    assert layers[1].combine_grad is backward[0] and layers[0].dispatch_grad is backward[-1]
    for layer in layers:
        assert (layer.counts is not None) == (dispatch == "ragged")
        assert bool(layer.split_nodes) == (dispatch == "ragged")
        assert {c.layer for c in (layer.dispatch, layer.combine, layer.combine_grad, layer.dispatch_grad)} == {layer.index}
    assert bool(analysis.host_syncs) == (dispatch == "ragged")
