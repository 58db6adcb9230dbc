"""Executor options: variant names with executors, refusals before any rank starts, phase idle from traces."""

from __future__ import annotations

import pytest
import torch

from lancet.app import cli
from lancet.app.bench import (
    BenchOptions,
    check_parts_divide_batch,
    inlines_collectives,
    is_known_variant,
    split_variant,
    variant_parts,
)
from lancet.measure.phases import phase_gaps, phase_metrics
from lancet.measure.trace_metrics import STEP_ANNOTATION
from lancet.runtime.executor import ExecutorConfig, ExecutorError, check_executor_device

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_variant_names_with_executors():
    assert split_variant("captured:compiled") == ("captured", "compiled")
    assert split_variant("tutel-d2") == ("tutel-d2", None)
    for name in ("eager", "eager-compiled", "captured:interpret", "tutel-d4:cudagraph", "lancet-dw:compiled",
                 "part-d2:compiled"):
        assert is_known_variant(name)
    for name in ("eager:compiled", "captured:fast", "captured:", "tutel-d0:compiled", "part-d1"):
        assert not is_known_variant(name)
    with pytest.raises(ValueError, match="need --plan"):
        BenchOptions(variants=["lancet:compiled"]).validate()


def test_variant_names_with_inlined_collectives():
    assert split_variant("captured:cudagraph+inline") == ("captured", "cudagraph")
    assert split_variant("tutel-d2+inline") == ("tutel-d2", None)
    assert variant_parts("tutel-d4+inline") == 4
    assert inlines_collectives("lancet+inline") and not inlines_collectives("lancet")
    for name in ("captured+inline", "captured:cudagraph+inline", "tutel-d2:compiled+inline", "lancet+inline"):
        assert is_known_variant(name)
    for name in ("eager+inline", "eager-compiled+inline", "captured+inlined", "captured+inline:compiled"):
        assert not is_known_variant(name)
    with pytest.raises(ValueError, match="need --plan"):
        BenchOptions(variants=["lancet-dw+inline"]).validate()


def test_part_counts_must_divide_the_rank_batch():
    assert [variant_parts(v) for v in ("tutel-d4:cudagraph", "part-d2", "captured", "lancet")] == [4, 2, None, None]
    check_parts_divide_batch(["eager", "tutel-d2", "part-d2"], 2)
    with pytest.raises(ValueError, match=r"tutel-d4, part-d3 split the batch.*batch of 2 samples"):
        check_parts_divide_batch(["tutel-d2", "tutel-d4", "part-d3"], 2)


def test_executor_config_is_checked():
    with pytest.raises(ValueError, match="unknown executor 'jit'"):
        ExecutorConfig(kind="jit")
    with pytest.raises(ExecutorError, match="needs a CUDA device; this run is on cpu"):
        check_executor_device("cudagraph", "cpu")
    check_executor_device("compiled", "cpu")


@pytest.fixture
def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ranks were launched despite bad input")

    monkeypatch.setattr(cli, "launch", fail)


@needs_cpu_only
@pytest.mark.parametrize("argv", [
    ["train", "--executor", "cudagraph"],
    ["bench", "--executor", "cudagraph", "--variants", "eager,captured"],
    ["bench", "--variants", "eager,captured:cudagraph"],
    ["profile", "--executor", "cudagraph", "--out", "p.json"],
])
def test_cudagraph_is_refused_without_cuda(no_launch, capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cudagraph executor replays CUDA graphs and needs a CUDA device" in err and "Traceback" not in err


def test_executor_with_eager_mode_is_refused(no_launch, capsys):
    assert cli.main(["train", "--mode", "eager", "--executor", "compiled"]) == 2
    assert "runs the captured graph; leave out --mode eager" in capsys.readouterr().err


def _event(name, ts, dur, cat, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 1, "args": args}


def test_phase_idle_time_from_kernels_launched_in_each_phase():
    """Forward kernels [10,20] [25,40] (idle 5 of 30); backward [50,60] [80,100] (idle 20 of 50)."""
    events = [
        _event(STEP_ANNOTATION, 0, 200, "user_annotation"),
        _event("lancet/forward", 1, 20, "user_annotation"),
        _event("lancet/backward", 30, 30, "user_annotation"),
    ]
    kernels = [(2, 10, 10), (3, 25, 15), (35, 50, 10), (40, 80, 20)]  # (launch ts, start, duration)
    for i, (launch, start, duration) in enumerate(kernels):
        events.append(_event("cudaLaunchKernel", launch, 1, "cuda_runtime", correlation=i))
        events.append(_event(f"kernel{i}", start, duration, "kernel", correlation=i, device=0, stream=7))
    metrics = phase_metrics({"traceEvents": events})
    assert metrics["forward_gpu_ms"] == pytest.approx(0.030) and metrics["forward_idle_ms"] == pytest.approx(0.005)
    assert metrics["backward_gpu_ms"] == pytest.approx(0.050) and metrics["backward_idle_ms"] == pytest.approx(0.020)
    assert metrics["step_idle_ms"] == pytest.approx((90 - 55) / 1e3)
    assert phase_metrics({"traceEvents": events[:3]}) == {}  # no kernels: a CPU trace


def test_compile_progress_away_from_a_terminal_prints_a_few_lines_and_the_report(capsys):
    from lancet.app.compile_progress import _Lines
    from lancet.runtime.compile import CompileEvent

    progress = _Lines("compile")
    for done in range(1, 41):
        progress(CompileEvent(done, 40, done, "forward", 45.0 if done == 7 else 0.5, done > 20,
                              "40 of 60 regions compiled" if done == 40 else None))
    lines = capsys.readouterr().out.splitlines()
    assert 10 <= len(lines) <= 13  # one per tenth, the slow region, and the report
    assert any("forward region 7: 45.0 s" in line for line in lines)
    assert lines[-1] == "compile: 40 of 60 regions compiled"


def test_phase_gaps_split_short_and_long_idle_and_name_the_longest():
    """Forward kernels [10,20] [22,30] [28,29] [60,70]: gaps of 2 us (after kernel0) and 30 us (after kernel1,
    which ends last though kernel2 starts later); backward kernels are not counted."""
    events = [
        _event(STEP_ANNOTATION, 0, 200, "user_annotation"),
        _event("lancet/forward", 1, 20, "user_annotation"),
        _event("lancet/backward", 30, 30, "user_annotation"),
    ]
    kernels = [(2, 10, 10), (3, 22, 8), (4, 28, 1), (5, 60, 10), (35, 100, 10)]  # (launch ts, start, duration)
    for i, (launch, start, duration) in enumerate(kernels):
        events.append(_event("cudaLaunchKernel", launch, 1, "cuda_runtime", correlation=i))
        events.append(_event(f"kernel{i}", start, duration, "kernel", correlation=i, device=0, stream=7))
    gaps = phase_gaps({"traceEvents": events}, "forward", small_us=10.0, top=2)
    assert gaps["gaps"] == 2
    assert gaps["small_gaps_ms"] == pytest.approx(0.002) and gaps["long_gaps_ms"] == pytest.approx(0.030)
    assert gaps["longest"] == [[pytest.approx(0.030), "kernel1", "kernel3"], [pytest.approx(0.002), "kernel0", "kernel1"]]
    assert gaps["small_by_next"] == [[pytest.approx(0.002), 1, "kernel1"]]  # the 30 us gap is not a short one
    assert phase_gaps({"traceEvents": events[:3]}) == {}  # no kernels: a CPU trace


def test_phase_picture_sets_each_traces_last_forward_side_by_side(tmp_path, capsys):
    """Two bench-like traces: the picture starts each forward at its first kernel and names the variant."""
    from lancet.measure.phase_picture import phase_spans

    events = [
        _event(STEP_ANNOTATION, 0, 200, "user_annotation"),
        _event("lancet/forward", 1, 20, "user_annotation"),
        _event("lancet/backward", 30, 30, "user_annotation"),
    ]
    kernels = [(2, 10, 10, "gemm"), (3, 25, 15, "ncclDevKernel_SendRecv"), (35, 50, 10, "gemm")]
    for i, (launch, start, duration, name) in enumerate(kernels):
        events.append(_event("cudaLaunchKernel", launch, 1, "cuda_runtime", correlation=i))
        events.append(_event(name, start, duration, "kernel", correlation=i, device=0, stream=7))
    trace = {"traceEvents": events}
    assert phase_spans(trace, "forward") == [("compute", 0.0, 0.010), ("all-to-all", 0.015, 0.030)]
    paths = []
    for variant in ("captured_cudagraph", "captured_interpret"):
        (tmp_path / variant).mkdir()
        paths += ["--trace", str(tmp_path / variant / "rank0.json")]
        (tmp_path / variant / "rank0.json").write_text(__import__("json").dumps(trace))
    out = tmp_path / "forward.png"
    assert cli.main(["timeline", *paths, "--phase", "forward", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert cli.main(["timeline", *paths, "--phase", "forward", "--label", "today", "--label", "graphs", "--out", str(out)]) == 0
    assert cli.main(["timeline", *paths, "--out", str(out)]) == 2
    assert "add --phase forward" in capsys.readouterr().err
    assert cli.main(["timeline", *paths, "--phase", "forward", "--label", "today", "--out", str(out)]) == 2
    assert "1 --label for 2 --trace" in capsys.readouterr().err
    (tmp_path / "cpu.json").write_text(__import__("json").dumps({"traceEvents": events[:3]}))
    assert cli.main(["timeline", "--trace", str(tmp_path / "cpu.json"), "--phase", "forward", "--out", str(out)]) == 2
    assert "cpu.json: the trace has no GPU kernels launched inside a lancet/forward range" in capsys.readouterr().err


def test_kernel_families_drop_what_varies_between_launches():
    from lancet.measure.kernel_names import kernel_family

    assert kernel_family("triton_poi_fused__to_copy_add_native_layer_norm_view_1") == "triton_poi_fused"
    assert kernel_family("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>(int)") == \
        "void at::native::reduce_kernel"
    assert kernel_family("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"


def test_bench_times_replays_only_over_the_timed_steps():
    """A runner that can time its replays is asked to after the warm-up and stops after the timed steps."""
    from types import SimpleNamespace

    from lancet.app.bench import _timed_steps

    calls = []

    class Replays:
        def time_replays(self, on):
            calls.append(("timing", on))

        def replay_ms(self):
            return {"forward": [1.0, 2.0]}

    def one_step(step):
        calls.append(("step", step))
        return 0.0

    runtime = SimpleNamespace(synchronize=lambda: None)
    collection = SimpleNamespace(after_step=lambda step: None)
    replay_ms: dict = {}
    opts = BenchOptions(variants=["captured"], steps=2, warmup=1)
    _timed_steps(one_step, opts, runtime, collection, [], Replays(), replay_ms)
    assert calls == [("step", 0), ("timing", True), ("step", 1), ("step", 2), ("timing", False)]
    assert replay_ms == {"forward": [1.0, 2.0]}

