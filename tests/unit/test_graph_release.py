"""A rank's orderly end destroys its CUDA graphs before the process group (the group's teardown waits for them)."""

from __future__ import annotations

import gc

import torch

from lancet.runtime import cudagraph, dist as lancet_dist
from lancet.runtime.cudagraph import GraphedPhase, release_graphs


class _FakeGraph:
    def __init__(self, log: list) -> None:
        self.log = log

    def reset(self) -> None:
        self.log.append("graph reset")


def _captured_phase(log: list) -> GraphedPhase:
    phase = GraphedPhase(lambda args: args, pool=None, fixed=set())
    phase.graph, phase.outputs, phase.buffers = _FakeGraph(log), ("out",), {0: "buffer"}
    return phase


def test_release_destroys_every_live_graph_and_only_those():
    log: list = []
    captured, not_yet = _captured_phase(log), GraphedPhase(lambda args: args, pool=None, fixed=set())
    assert release_graphs() == 1 and log == ["graph reset"]
    assert captured.graph is None and captured.outputs is None and captured.buffers == {}
    assert not_yet.graph is None
    assert release_graphs() == 0  # nothing captured is left


def test_phases_no_longer_referenced_are_not_held_by_the_registry():
    log: list = []
    _captured_phase(log)
    gc.collect()
    assert release_graphs() == 0 and log == []


def test_shutdown_releases_graphs_between_the_barrier_and_the_teardown(monkeypatch):
    log: list = []
    phase = _captured_phase(log)  # noqa: F841 (alive through the shutdown, as a rank job's executor is)
    monkeypatch.setattr(lancet_dist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(lancet_dist.dist, "barrier", lambda: log.append("barrier"))
    monkeypatch.setattr(lancet_dist.dist, "destroy_process_group", lambda: log.append("destroy"))
    monkeypatch.setattr(lancet_dist.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lancet_dist.torch.cuda, "synchronize", lambda: log.append("synchronize"))
    lancet_dist.shutdown_runtime()
    assert log == ["barrier", "graph reset", "synchronize", "destroy"]
    assert cudagraph.release_graphs() == 0


def _tiny_graph():
    from lancet.app.data import BatchSource
    from lancet.capture.trace import capture_step
    from lancet.models import build_model, model_config
    from lancet.moe import GateConfig
    from lancet.step.train_step import TrainStep

    cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch"))
    step = TrainStep(build_model(cfg, None, world_size=1), None)
    batch = BatchSource(batch_size=4, seq_len=8, vocab_size=97).batch(0, 0)
    return step, batch, capture_step(step, *batch)


def test_an_executor_closes_its_graphs_and_runs_again_afterwards():
    from lancet.runtime.executor import make_executor

    step, batch, graph = _tiny_graph()
    executor = make_executor(graph, "interpret")
    log: list = []
    phase = executor.program.phases[0]
    phase.impl = _captured_phase(log)  # as cudagraph's warm-up leaves it, without a GPU
    executor.close()
    assert log == ["graph reset"] and phase.impl == phase.module.forward
    result = executor(step.parameters(), *batch)  # runs op by op again
    assert torch.isfinite(result.loss)


def test_runner_close_and_with_block_release_the_executor(monkeypatch):
    import lancet
    from lancet.runtime.executor import StepExecutor

    closed: list = []
    monkeypatch.setattr(StepExecutor, "close", lambda self: closed.append(self))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    step = lancet.Step(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    with lancet.Runner(step, executor="interpret") as runner:
        runner.step(batch)
        built = runner._run
    assert closed == [built] and runner._run is None
    runner.step(batch)  # builds again
    assert isinstance(runner._run, StepExecutor)
