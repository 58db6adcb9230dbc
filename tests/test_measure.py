"""Overlap metrics from profiler traces: interval arithmetic, synthetic GPU/CPU traces, a real CPU profile."""

from __future__ import annotations

import sys

import pytest
import torch

from lancet import measure
from lancet.measure import STEP_ANNOTATION, analyze_trace, merge_intervals, subtract, total_length


def test_interval_arithmetic():
    assert merge_intervals([(3, 4), (0, 2), (1, 3), (5, 5)]) == [(0, 4)]
    assert total_length([(0, 2), (1, 3), (10, 11)]) == 4
    assert subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
    assert subtract([(0, 10)], [(-5, 20)]) == []
    assert subtract([(0, 1), (4, 6)], []) == [(0, 1), (4, 6)]
    assert subtract([], [(0, 1)]) == []


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def _gpu_trace():
    # times in us; two steps of 1000 us
    events = [
        _kernel(STEP_ANNOTATION, 0, 1000, cat="gpu_user_annotation"),
        _kernel(STEP_ANNOTATION, 2000, 1000, cat="gpu_user_annotation"),
        # step 0: compute [0,300] [500,900]; a2a [200,600] -> exposed 200 (300..500); all-reduce [900,1000] exposed
        _kernel("ampere_bf16_gemm", 0, 300),
        _kernel("ampere_bf16_gemm", 500, 400),
        _kernel("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 200, 400),
        _kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 900, 100),
        _kernel("Memcpy DtoH", 950, 40, cat="gpu_memcpy"),
        # step 1: a2a fully hidden under compute
        _kernel("elementwise_kernel", 2000, 800),
        _kernel("ncclDevKernel_SendRecv(x)", 2100, 300),
    ]
    return {"traceEvents": events}


def test_gpu_trace_metrics():
    steps = analyze_trace(_gpu_trace())
    assert len(steps) == 2
    first, second = steps
    assert first.step_ms == pytest.approx(1.0)
    assert first.compute_ms == pytest.approx(0.7)
    assert first.a2a_ms == pytest.approx(0.4)
    assert first.allreduce_ms == pytest.approx(0.1)
    assert first.exposed_a2a_ms == pytest.approx(0.2)
    assert first.exposed_comm_ms == pytest.approx(0.3)
    assert second.exposed_comm_ms == pytest.approx(0.0)
    assert measure.median_metrics(steps).a2a_ms == pytest.approx(0.35)


def test_cpu_trace_metrics():
    events = [
        {"ph": "X", "cat": "user_annotation", "name": STEP_ANNOTATION, "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 40, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "_c10d_functional::all_to_all_single", "ts": 40, "dur": 5, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "_c10d_functional::wait_tensor", "ts": 45, "dur": 15, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "_c10d_functional::all_reduce", "ts": 70, "dur": 2, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "_c10d_functional::wait_tensor", "ts": 72, "dur": 8, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "gloo:all_to_all", "ts": 40, "dur": 20, "tid": 99},
    ]
    (step,) = analyze_trace({"traceEvents": events})
    assert step.exposed_comm_ms == pytest.approx(0.030)
    assert step.exposed_a2a_ms == pytest.approx(0.020)
    assert step.allreduce_ms == pytest.approx(0.010)
    assert step.compute_ms == pytest.approx(0.070)


def test_profile_steps_on_cpu_writes_trace_and_png(tmp_path):
    a = torch.randn(128, 128)

    def step(i):
        for _ in range(3):
            a @ a

    trace = measure.profile_steps(step, steps=3, warmup=1, device=torch.device("cpu"), trace_path=tmp_path / "t.json")
    assert (tmp_path / "t.json").exists()
    steps = analyze_trace(trace)
    assert len(steps) == 3 and all(s.step_ms > 0 for s in steps)
    measure.plot_timeline(trace, 1, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_hta_cross_check_is_optional(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "hta", None)
    monkeypatch.setitem(sys.modules, "hta.trace_analysis", None)
    assert measure.hta_exposed_comm_ms(tmp_path) is None
