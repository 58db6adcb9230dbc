"""Collectives waited at once, run as blocking calls on the compute stream, give the same step bitwise.

Two gloo ranks, fp32, a one-layer model, the interpreted executor (the retargeting is the same for every
executor; the compiled one is built, not run, to check it inlines the same collectives): the captured step,
where every collective is waited at once, and a dW-scheduled step, whose backward all-to-all windows hold
compute and stay asynchronous.
"""

from __future__ import annotations

import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.cost.model import ToyCostModel
from lancet.graph.roles import Role, node_role, wait_of
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.dw import dw_pass
from lancet.runtime.captured import CapturedStep
from lancet.runtime.executor import make_executor
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

STEPS = 2


def _waited_at_once(graph) -> int:
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    position = {n: i for i, n in enumerate(nodes)}
    return sum(1 for n in nodes if node_role(n) == Role.COMM_START and str(n.target).split(".")[1]
               in ("all_to_all_single", "all_reduce") and position[wait_of(n)] == position[n] + 1)


def _check(graph, step: TrainStep, source: BatchSource, rank: int) -> dict:
    reference = CapturedStep(graph)
    inlined = make_executor(graph, "interpret", inline_collectives=True)
    compiled = make_executor(graph, "compiled", inline_collectives=True)
    params = [p.detach().clone() for p in step.parameters()]
    for s in range(STEPS):
        batch = source.batch(s, rank)
        want, got = reference(params, *batch), inlined(params, *batch)
        assert torch.equal(got.loss, want.loss), f"step {s}: loss"
        for name, g, w in zip(step.param_names, got.grads, want.grads):
            assert torch.equal(g, w), f"step {s}: gradient of {name}"
        for g, w in zip(got.keep, want.keep):
            assert torch.equal(g, w), f"step {s}: dropped tokens"
        with torch.no_grad():
            for p, g in zip(params, want.grads):
                p.sub_(0.5 * g)
    return {"inlined": inlined.compile_report.inlined_collectives,
            "inlined_compiled": compiled.compile_report.inlined_collectives,
            "waited_at_once": _waited_at_once(graph),
            "collectives": sum(1 for n in graph.graph.nodes if node_role(n) == Role.COMM_START)}


def _rank(group) -> dict:
    cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch"))
    step = TrainStep(build_model(cfg, group, seed=3), group, bucket_bytes=8192)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=4)
    batch = source.batch(0, group.rank())
    scheduled = capture_step(step, *batch)
    _, decisions = dw_pass(scheduled, ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5}).costs(scheduled.graph))
    assert decisions.num_moved > 0
    scheduled.gm.recompile()
    return {"captured": _check(capture_step(step, *batch), step, source, group.rank()),
            "dw": _check(scheduled, step, source, group.rank())}


def test_inlined_collectives_give_the_same_step():
    for summary in run_ranks(_rank, 2):
        captured, dw = summary["captured"], summary["dw"]
        # the captured step waits for every collective at once: all of them run on the compute stream
        assert captured["inlined"] == captured["waited_at_once"] == captured["collectives"] > 0
        # dW scheduling put compute into backward all-to-all windows: those stay asynchronous
        assert 0 < dw["inlined"] == dw["waited_at_once"] < dw["collectives"]
        assert captured["inlined_compiled"] == captured["inlined"] and dw["inlined_compiled"] == dw["inlined"]
