"""A rank's orderly end destroys its CUDA graphs before the process group (the group's teardown waits for them)."""

from __future__ import annotations

import gc

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
