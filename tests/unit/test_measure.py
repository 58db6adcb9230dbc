"""Overlap metrics from profiler traces: interval arithmetic, synthetic GPU/CPU traces, a real CPU profile."""

from __future__ import annotations

import gzip
import json
import sys

import pytest
import torch

from lancet.measure import trace_metrics as measure
from lancet.measure.trace_metrics import STEP_ANNOTATION, analyze_trace, merge_intervals, subtract, total_length

SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"
ALLREDUCE = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def test_merge_intervals():
    assert merge_intervals([]) == []
    assert merge_intervals([(3, 4), (0, 2), (1, 3)]) == [(0, 4)]
    assert merge_intervals([(0, 10), (2, 3)]) == [(0, 10)]
    assert merge_intervals([(5, 6), (0, 1)]) == [(0, 1), (5, 6)]
    assert merge_intervals([(0, 1), (1, 2), (4, 4), (7, 6)]) == [(0, 2)]


def test_total_length():
    assert total_length([]) == 0
    assert total_length([(0, 2), (1, 3), (10, 11)]) == 4
    assert total_length([(0, 10), (2, 3)]) == 10


def test_subtract():
    assert subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
    assert subtract([(0, 10)], [(-5, 20)]) == []
    assert subtract([(0, 4), (6, 10)], [(3, 7)]) == [(0, 3), (7, 10)]
    assert subtract([(0, 1), (4, 6)], [(2, 3)]) == [(0, 1), (4, 6)]
    assert subtract([(0, 1), (4, 6)], []) == [(0, 1), (4, 6)]
    assert subtract([], [(0, 1)]) == []
    assert subtract([(2, 5), (0, 3)], [(1, 2), (1, 1.5)]) == [(0, 1), (2, 5)]


def _event(name, ts, dur, cat="kernel", stream=7, **args):
    if cat == "kernel":
        args = {"device": 0, "stream": stream, **args}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream, "args": args}


def _gpu_trace():
    """Two 1000 us steps; in step 1 the annotation is split over two streams, as kineto writes it."""
    events = [
        _event(STEP_ANNOTATION, 0, 1000, cat="gpu_user_annotation", **{"External id": 11}),
        _event(STEP_ANNOTATION, 2000, 600, cat="gpu_user_annotation", **{"External id": 12}),
        _event(STEP_ANNOTATION, 2100, 900, cat="gpu_user_annotation", stream=20, **{"External id": 12}),
        # step 0: compute [0,300] [500,900]; all-to-all [200,600] (200 exposed); all-reduce [900,1000] exposed
        _event("ampere_bf16_s16816gemm_bf16_128x128", 0, 300),
        _event("ampere_bf16_s16816gemm_bf16_128x128", 500, 400),
        _event(SENDRECV, 200, 400, stream=20),
        _event(ALLREDUCE, 900, 100, stream=20),
        _event("Memcpy DtoH (Device -> Pinned)", 950, 40, cat="gpu_memcpy"),
        # step 1: all-to-all [2100,2400] hidden under compute [2000,2600]; all-reduce [2500,3000] half hidden
        _event("void at::native::elementwise_kernel<128, 4>", 2000, 600),
        _event(SENDRECV, 2100, 300, stream=20),
        _event(ALLREDUCE, 2500, 500, stream=20),
        _event("Memset (Device)", 2700, 100, cat="gpu_memset"),
    ]
    return {"distributedInfo": {"backend": "nccl", "rank": 0, "world_size": 2}, "traceEvents": events}


def test_gpu_trace_metrics():
    first, second = analyze_trace(_gpu_trace())
    assert first.step_ms == pytest.approx(1.0)
    assert first.compute_ms == pytest.approx(0.7)
    assert first.comm_ms == pytest.approx(0.5)
    assert first.a2a_ms == pytest.approx(0.4)
    assert first.allreduce_ms == pytest.approx(0.1)
    assert first.exposed_a2a_ms == pytest.approx(0.2)
    assert first.exposed_comm_ms == pytest.approx(0.3)
    assert second.step_ms == pytest.approx(1.0)
    assert second.compute_ms == pytest.approx(0.6)
    assert second.comm_ms == pytest.approx(0.8)
    assert second.exposed_a2a_ms == pytest.approx(0.0)
    assert second.exposed_comm_ms == pytest.approx(0.4)


def test_gpu_trace_falls_back_to_cpu_step_annotations():
    trace = _gpu_trace()
    for event in trace["traceEvents"]:
        if event["cat"] == "gpu_user_annotation":
            event["cat"] = "user_annotation"
    trace["traceEvents"] = trace["traceEvents"][:2] + trace["traceEvents"][3:]
    steps = analyze_trace(trace)
    assert [s.step_ms for s in steps] == pytest.approx([1.0, 0.6])
    assert steps[0].exposed_comm_ms == pytest.approx(0.3)


def test_median_and_summarize():
    steps = analyze_trace(_gpu_trace())
    assert measure.median_metrics(steps).a2a_ms == pytest.approx(0.35)
    summary = measure.summarize(_gpu_trace())
    assert summary["steps"] == 2
    assert summary["exposed_comm_ms"] == pytest.approx(0.35)
    json.dumps(summary)
    with pytest.raises(ValueError):
        measure.median_metrics([])


def _cpu_op(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def _cpu_trace():
    """One 100 us step on thread 1 with gloo functional collectives, as torch records them."""
    events = [
        {"ph": "X", "cat": "user_annotation", "name": STEP_ANNOTATION, "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        _cpu_op("aten::mm", 0, 40),
        _cpu_op("_c10d_functional::all_to_all_single", 40, 5),
        _cpu_op("c10d::alltoall_base_", 41, 2),
        _cpu_op("_c10d_functional::_wrap_tensor_autograd", 44, 1),
        _cpu_op("_c10d_functional::wait_tensor", 45, 15),
        _cpu_op("aten::add", 60, 10),
        _cpu_op("_c10d_functional::all_reduce", 70, 2),
        _cpu_op("aten::mul", 72, 20),
        _cpu_op("_c10d_functional::wait_tensor", 72, 8),
        {"ph": "X", "cat": "user_annotation", "name": "gloo:all_to_all", "ts": 40, "dur": 20, "pid": 1, "tid": 99},
        _cpu_op("gloo:all_to_all", 40, 30, tid=99),
    ]
    return {"traceEvents": events}


def test_cpu_trace_metrics():
    (step,) = analyze_trace(_cpu_trace())
    assert step.step_ms == pytest.approx(0.1)
    assert step.comm_ms == pytest.approx(0.030)
    assert step.exposed_comm_ms == pytest.approx(0.030)
    assert step.a2a_ms == pytest.approx(0.020)
    assert step.exposed_a2a_ms == pytest.approx(0.020)
    assert step.allreduce_ms == pytest.approx(0.010)
    assert step.compute_ms == pytest.approx(0.070)


@pytest.mark.parametrize("trace", [_gpu_trace(), _cpu_trace()], ids=["gpu", "cpu"])
def test_plot_timeline_of_synthetic_traces(trace, tmp_path):
    measure.plot_timeline(trace, 0, tmp_path / "step.png")
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(IndexError):
        measure.plot_timeline(trace, 5, tmp_path / "missing.png")


def _matmuls(i: int) -> None:
    a = torch.randn(64, 64)
    for _ in range(3):
        a = a @ a / 64


def test_profile_steps_on_cpu_writes_trace_and_png(tmp_path):
    path = tmp_path / "trace.json"
    trace = measure.profile_steps(_matmuls, steps=3, warmup=1, device=torch.device("cpu"), trace_path=path)
    assert path.exists()
    steps = analyze_trace(trace)
    assert len(steps) == 3
    assert all(s.step_ms > 0 and s.exposed_comm_ms == 0 for s in steps)
    measure.plot_timeline(trace, 1, tmp_path / "step.png")
    assert (tmp_path / "step.png").stat().st_size > 1000


def test_profile_steps_writes_gzip(tmp_path):
    path = tmp_path / "trace.json.gz"
    trace = measure.profile_steps(_matmuls, steps=2, warmup=0, device=torch.device("cpu"), trace_path=path)
    with gzip.open(path, "rt") as f:
        assert json.load(f) == trace
    assert measure.summarize(trace)["steps"] == 2


def test_hta_cross_check_is_optional(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "hta", None)
    monkeypatch.setitem(sys.modules, "hta.trace_analysis", None)
    assert measure.hta_exposed_comm_ms(tmp_path) is None


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_hta_cross_check_agrees_with_analyze_trace(tmp_path):
    pytest.importorskip("hta.trace_analysis")
    (tmp_path / "rank0.json").write_text(json.dumps(_gpu_trace()))
    expected = measure.summarize(_gpu_trace())["exposed_comm_ms"]
    assert measure.hta_exposed_comm_ms(tmp_path, rank=0) == pytest.approx(expected, rel=1e-3)  # HTA rounds its %


def test_backward_all_to_all_split():
    (first, second) = analyze_trace(_gpu_trace(), forward_a2a=0)
    assert first.backward_a2a_ms == pytest.approx(first.a2a_ms)
    assert first.exposed_backward_a2a_ms == pytest.approx(first.exposed_a2a_ms)
    (first, _) = analyze_trace(_gpu_trace(), forward_a2a=1)
    assert first.backward_a2a_ms == 0.0


def test_kernels_belong_to_the_step_that_launched_them():
    """A gradient all-reduce still running after the compute stream's annotation ends stays in its step."""

    def launch(corr, ts):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}

    def kernel(name, corr, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}

    events = [
        {"ph": "X", "cat": "user_annotation", "name": STEP_ANNOTATION, "ts": 0, "dur": 500, "tid": 1},
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP_ANNOTATION, "ts": 10, "dur": 200, "tid": 7},
        launch(1, 5), kernel("gemm", 1, 10, 200),
        launch(2, 6), kernel("ncclDevKernel_AllReduce_Sum_f32", 2, 210, 100),  # after the annotation
        {"ph": "X", "cat": "user_annotation", "name": STEP_ANNOTATION, "ts": 600, "dur": 100, "tid": 1},
        launch(3, 601), kernel("gemm", 3, 605, 50),
    ]
    first, second = analyze_trace({"traceEvents": events})
    assert first.step_ms == pytest.approx(0.3)
    assert first.allreduce_ms == pytest.approx(0.1)
    assert first.exposed_comm_ms == pytest.approx(0.1)
    assert second.step_ms == pytest.approx(0.05)
