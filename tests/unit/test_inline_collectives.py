"""inline_collectives retargets exactly the collectives whose wait comes next, and keeps names and order."""

from __future__ import annotations

import pytest
import torch

from lancet.runtime.inline_collectives import (
    ENV,
    all_reduce_now,
    all_to_all_single_now,
    completed,
    inline_candidates,
    inline_collectives,
    inline_from_environment,
)
from tests.graphs import GraphBuilder

c10d = torch.ops._c10d_functional


def _graph():
    """a2a_1 waited at once; a2a_2 with an mm in its window; an all-reduce waited at once; one waited late."""
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    splits = [b.input("split0"), b.input("split1")]
    _, wait_1 = b.all_to_all(b.mm(x, w, name="h1"), splits, "a2a_1")
    a2a_2 = b.op(c10d.all_to_all_single.default, wait_1, splits, splits, "0", name="a2a_2")
    inside = b.mm(x, w, name="inside")
    wait_2 = b.op(c10d.wait_tensor.default, a2a_2, name="wait_a2a_2")
    _, reduced = b.all_reduce(inside, "ar_now")
    late = b.op(c10d.all_reduce.default, wait_2, "sum", "0", name="ar_late")
    after = b.mm(reduced, w, name="after")
    late_wait = b.op(c10d.wait_tensor.default, late, name="wait_ar_late")
    return b.finish(after, late_wait)


@pytest.mark.unit
def test_only_collectives_waited_at_once_are_inlined():
    graph = _graph()
    names = [n.name for n in graph.gm.graph.nodes]
    collectives = [n.name for n in graph.gm.graph.nodes if "a2a" in n.name or "ar_" in n.name]
    assert inline_collectives(graph.gm, inline_candidates(graph.gm.graph)) == 2
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    assert nodes["a2a_1"].target is all_to_all_single_now and nodes["wait_a2a_1"].target is completed
    assert nodes["ar_now"].target is all_reduce_now and nodes["wait_ar_now"].target is completed
    # a window with compute in it, and a wait after other work, stay asynchronous
    assert nodes["a2a_2"].target is c10d.all_to_all_single.default
    assert nodes["wait_a2a_2"].target is c10d.wait_tensor.default
    assert nodes["ar_late"].target is c10d.all_reduce.default
    assert [n.name for n in graph.gm.graph.nodes] == names
    assert [n.name for n in graph.gm.graph.nodes if "a2a" in n.name or "ar_" in n.name] == collectives
    graph.gm.graph.lint()
    graph.gm.recompile()


@pytest.mark.unit
def test_a_start_with_another_user_stays_asynchronous():
    b = GraphBuilder()
    x = b.input("x")
    start, wait = b.all_reduce(x, "ar")
    other = b.op(torch.ops.aten.add.Tensor, start, x, name="reads_the_start")
    graph = b.finish(wait, other)
    assert inline_candidates(graph.gm.graph) == set()


@pytest.mark.unit
def test_a_collective_inside_another_ones_window_stays_asynchronous():
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    splits = [b.input("split0"), b.input("split1")]
    a2a = b.op(c10d.all_to_all_single.default, x, splits, splits, "0", name="a2a")
    b.all_reduce(b.mm(x, w, name="dw"), "ar_inside")  # waited at once, but the all-to-all is in flight
    wait = b.op(c10d.wait_tensor.default, a2a, name="wait_a2a")
    b.all_reduce(wait, "ar_after")
    graph = b.finish(wait)
    assert inline_candidates(graph.gm.graph) == {"ar_after"}


@pytest.mark.unit
def test_the_environment_switch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert inline_from_environment() is False
    monkeypatch.setenv(ENV, "1")
    assert inline_from_environment() is True
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match="0 or 1"):
        inline_from_environment()


@pytest.mark.unit
def test_an_unknown_reduce_op_is_refused():
    with pytest.raises(ValueError, match="unknown reduce op"):
        all_reduce_now(torch.ones(2), "median", "0")


@pytest.mark.unit
def test_collectives_of_an_emulated_group_stay_asynchronous():
    from lancet.capture.trace import capture_step
    from lancet.models import build_model, model_config
    from lancet.moe import GateConfig
    from lancet.runtime.emulation import EmulationSpec, emulated_runtime
    from lancet.step.train_step import TrainStep
    from tests.emulation import toy_regime

    with emulated_runtime(EmulationSpec(world_size=2, regime=toy_regime(0.0, 0.0))) as runtime:
        cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch"))
        step = TrainStep(build_model(cfg, runtime.group, seed=3), runtime.group)
        tokens = torch.randint(0, 97, (cfg.batch_size, cfg.seq_len))
        graph = capture_step(step, tokens, tokens)
        assert any(n.target is c10d.all_to_all_single.default for n in graph.gm.graph.nodes)
        assert inline_candidates(graph.gm.graph) == set()


@pytest.mark.unit
def test_a_bad_switch_is_refused_before_any_rank_starts(monkeypatch, capsys):
    from lancet.app import cli

    monkeypatch.setattr(cli, "launch", lambda *a, **k: pytest.fail("ranks were launched despite bad input"))
    monkeypatch.setenv(ENV, "true")
    assert cli.main(["bench", "--variants", "eager,captured"]) == 2
    err = capsys.readouterr().err
    assert f"{ENV} must be 0 or 1" in err and "Traceback" not in err
