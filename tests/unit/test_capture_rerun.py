"""A phase is captured without an uncaptured run first when its inputs look as in the warm-up, and only then."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lancet.runtime import cudagraph
from lancet.runtime.cudagraph import GraphedPhase, WarmPhase, input_signature, signature_differences


class _FakeGraph:
    def replay(self) -> None:
        pass

    def reset(self) -> None:
        pass


@pytest.fixture
def fake_capture(monkeypatch):
    """CUDA-graph capture replaced by a plain call (the capture's bookkeeping is what these tests check)."""
    monkeypatch.setattr(cudagraph.torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(cudagraph.torch.cuda, "graph", lambda *args, **kwargs: contextlib.nullcontext())


def _counting_phase(calls: list):
    def run(args: list):
        calls.append(len(args))
        return (args[0] * 2,)

    return run


def test_signature_sees_device_dtype_shape_strides_and_aliasing():
    x = torch.zeros(4, 6)
    assert input_signature([x, 3]) == input_signature([torch.ones(4, 6), 3])
    assert input_signature([x]) != input_signature([x.double()])
    assert input_signature([x]) != input_signature([x.t()])          # strides
    assert input_signature([x]) != input_signature([x[1:]])          # shape and offset
    assert input_signature([x, x.clone()]) != input_signature([x, x])  # aliasing
    assert input_signature([x, 3]) != input_signature([x, 4])        # values of plain arguments
    assert signature_differences(input_signature([x]), input_signature([x.t()]))[0].startswith("argument 0:")
    assert signature_differences(None, ()) == ["no warm-up call was recorded"]


def test_warm_phase_records_its_last_call_and_runs_it():
    calls: list = []
    warm = WarmPhase(_counting_phase(calls))
    out = warm([torch.ones(3)])
    assert calls == [1] and torch.equal(out[0], torch.full((3,), 2.0))
    assert warm.signature == input_signature([torch.ones(3)])


def test_capture_skips_the_uncaptured_run_when_inputs_match_the_warm_up(fake_capture):
    calls: list = []
    batch = torch.ones(3)
    phase = GraphedPhase(_counting_phase(calls), pool=None, fixed=set(), warm_signature=input_signature([batch]))
    phase([batch])
    assert calls == [1] and phase.capture_differences == []  # captured only


def test_capture_runs_once_uncaptured_first_when_an_input_changed(fake_capture):
    calls: list = []
    phase = GraphedPhase(_counting_phase(calls), pool=None, fixed=set(),
                         warm_signature=input_signature([torch.ones(3, dtype=torch.float64)]))
    phase([torch.ones(3)])
    assert calls == [1, 1] and phase.capture_differences[0].startswith("argument 0:")


def test_capture_without_a_recorded_warm_up_runs_uncaptured_first(fake_capture):
    calls: list = []
    phase = GraphedPhase(_counting_phase(calls), pool=None, fixed=set())
    phase([torch.ones(3)])
    assert calls == [1, 1] and phase.capture_differences == ["no warm-up call was recorded"]
