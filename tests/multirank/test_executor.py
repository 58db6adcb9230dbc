"""The compiled executor equals the interpreted graph, and runs collectives and regions in the plan's order.

Two gloo ranks, fp32, a one-layer model (few regions: Inductor compiles C++ on
the CPU, which is slow): the captured step, a dW-scheduled step and a step whose
MoE dispatch is pipelined in two parts (tutel-d2), several steps each with
parameters moved in between (so routing, and the all-to-all sizes, change).
"""

from __future__ import annotations

import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.cost.model import ToyCostModel
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.dw import dw_pass
from lancet.plan.plan import tutel_graph
from lancet.runtime.captured import CapturedStep
from lancet.runtime.executor import make_executor
from lancet.runtime.program import program_order
from lancet.runtime.record import expected_execution, record_execution
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

# fp32: Inductor fuses and reorders arithmetic inside a region, so values agree to rounding, not bitwise.
RTOL = 1e-5
STEPS = 3


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _graphs(step: TrainStep, tokens, targets) -> dict:
    """The captured step, the same with dW nodes moved into all-to-all windows, and tutel-d2."""
    scheduled = capture_step(step, tokens, targets)
    _, decisions = dw_pass(scheduled, ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5}).costs(scheduled.graph))
    assert decisions.num_moved > 0
    scheduled.gm.recompile()
    return {"captured": capture_step(step, tokens, targets), "dw": scheduled,
            "tutel-d2": tutel_graph(step, tokens, targets, 2)}


def _check_graph(name: str, graph, step: TrainStep, source: BatchSource, rank: int, functions: dict) -> dict:
    reference, executor = CapturedStep(graph), make_executor(graph, "compiled", functions=functions)
    assert executor.kind == "compiled" and executor.program.calls
    assert program_order(executor.program) == [n.name for n in graph.graph.nodes if n.op == "call_function"]
    params = [p.detach().clone() for p in step.parameters()]
    for s in range(STEPS):
        batch = source.batch(s, rank)
        want, got = reference(params, *batch), executor(params, *batch)
        assert _relative(got.loss, want.loss) < RTOL, f"{name} step {s}: loss"
        for param_name, g, w in zip(step.param_names, got.grads, want.grads):
            assert _relative(g, w) < RTOL, f"{name} step {s}: gradient of {param_name}"
        for g, w in zip(got.keep, want.keep):
            assert torch.equal(g, w), f"{name} step {s}: dropped tokens differ"
        with torch.no_grad():
            for p, g in zip(params, want.grads):
                p.sub_(0.5 * g)
    with record_execution() as executed:
        executor(params, *source.batch(STEPS, rank))
    compiled = set(executor.program.calls)
    assert executed == expected_execution(graph.graph, executor.program.regions, compiled), name
    report = executor.compile_report
    assert report.compiled_regions == len(compiled)
    return {"regions": report.regions, "compiled": report.compiled_regions, "shared": report.shared,
            "seconds": report.seconds,
            "collectives": sum(1 for kind, op in executed if kind == "op" and op.startswith("_c10d_functional::all"))}


def _compare_rank(group) -> dict:
    cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch"))
    step = TrainStep(build_model(cfg, group, seed=3), group, bucket_bytes=8192)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=4)
    graphs = _graphs(step, *source.batch(0, group.rank()))
    functions: dict = {}  # the three steps share their alike regions (the forward of captured and dw)
    return {name: _check_graph(name, graph, step, source, group.rank(), functions) for name, graph in graphs.items()}


def test_compiled_executor_matches_interpreted_graph_and_keeps_the_order():
    per_rank = run_ranks(_compare_rank, 2)
    for summary in per_rank:
        assert set(summary) == {"captured", "dw", "tutel-d2"}
        assert all(s["compiled"] > 0 and s["collectives"] > 0 for s in summary.values())
        # tutel-d2 pipelines the dispatch in two parts: more collectives than the captured step.
        assert summary["tutel-d2"]["collectives"] > summary["captured"]["collectives"]
        # dW scheduling moved only backward nodes: the forward's compiled regions were reused.
        assert summary["dw"]["shared"] > 0
