"""Profile steps with torch.profiler and compute overlap metrics from the trace.

The metric is Lancet's: *exposed communication* is the part of communication
time not covered by any compute kernel. Per profiled step (one
``record_function("lancet/step")`` range):

- GPU traces: kernels are events of category ``kernel``. NCCL kernels
  (name matches ``nccl``) are communication: all-to-all is NCCL's grouped
  send/recv (``SendRecv``/``AllToAll``), all-reduce ``AllReduce``; every other
  kernel is compute. Memcpy/memset events are neither.
- CPU traces (gloo): the host thread blocks inside collective calls and waits,
  so communication is the time the step's thread spends in
  ``_c10d_functional``/``c10d`` ops; it is all exposed (a CPU trace cannot show
  hidden communication), and compute is the rest of the step.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

STEP_ANNOTATION = "lancet/step"
_NCCL = re.compile("nccl", re.IGNORECASE)
_A2A = re.compile("SendRecv|AllToAll|alltoall|all_to_all", re.IGNORECASE)
_ALLREDUCE = re.compile("AllReduce|all_reduce", re.IGNORECASE)
_CPU_COMM = re.compile(r"^(_c10d_functional|c10d|_c10d_functional_autograd)::|gloo", re.IGNORECASE)

Intervals = list[tuple[float, float]]


def merge_intervals(intervals: Intervals) -> Intervals:
    merged: Intervals = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_length(intervals: Intervals) -> float:
    return sum(end - start for start, end in merge_intervals(intervals))


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """Parts of ``a`` not covered by ``b`` (both merged first); linear after sorting."""
    a, b = merge_intervals(a), merge_intervals(b)
    out: Intervals = []
    j = 0
    for start, end in a:
        cursor = start
        while j < len(b) and b[j][1] <= cursor:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


@dataclass(slots=True)
class StepMetrics:
    """One profiled step, in milliseconds."""

    step_ms: float
    compute_ms: float
    comm_ms: float
    a2a_ms: float
    allreduce_ms: float
    exposed_comm_ms: float
    exposed_a2a_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def _span(event: dict) -> tuple[float, float]:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _events(trace: dict) -> list[dict]:
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]


def _step_windows(events: list[dict], gpu: bool) -> list[dict]:
    wanted = ("gpu_user_annotation",) if gpu else ()
    windows = [e for e in events if e.get("name") == STEP_ANNOTATION and e.get("cat") in wanted]
    if not windows:
        windows = [e for e in events if e.get("name") == STEP_ANNOTATION and e.get("cat") == "user_annotation"]
    return sorted(windows, key=lambda e: float(e["ts"]))


def _metrics(window: tuple[float, float], compute: Intervals, comm: Intervals, a2a: Intervals, ar: Intervals) -> StepMetrics:
    ms = 1e-3
    return StepMetrics(
        step_ms=(window[1] - window[0]) * ms,
        compute_ms=total_length(compute) * ms,
        comm_ms=total_length(comm) * ms,
        a2a_ms=total_length(a2a) * ms,
        allreduce_ms=total_length(ar) * ms,
        exposed_comm_ms=total_length(subtract(comm, compute)) * ms,
        exposed_a2a_ms=total_length(subtract(a2a, compute)) * ms,
    )


def _in_window(spans: list[tuple[str, float, float]], window: tuple[float, float]) -> list[tuple[str, float, float]]:
    return [(n, s, e) for n, s, e in spans if window[0] <= s < window[1]]


def _gpu_steps(events: list[dict]) -> list[StepMetrics]:
    kernels = [(e["name"], *_span(e)) for e in events if e.get("cat") == "kernel"]
    steps = []
    for window_event in _step_windows(events, gpu=True):
        window = _span(window_event)
        inside = _in_window(kernels, window)
        comm = [(n, s, e) for n, s, e in inside if _NCCL.search(n)]
        compute = [(s, e) for n, s, e in inside if not _NCCL.search(n)]
        steps.append(
            _metrics(
                window,
                compute,
                [(s, e) for _, s, e in comm],
                [(s, e) for n, s, e in comm if _A2A.search(n)],
                [(s, e) for n, s, e in comm if _ALLREDUCE.search(n)],
            )
        )
    return steps


def _cpu_steps(events: list[dict]) -> list[StepMetrics]:
    steps = []
    for window_event in _step_windows(events, gpu=False):
        window = _span(window_event)
        thread = window_event.get("tid")
        ops = [
            (e["name"], *_span(e))
            for e in events
            if e.get("cat") == "cpu_op" and e.get("tid") == thread and _CPU_COMM.search(e["name"])
        ]
        inside = sorted(_in_window(ops, window), key=lambda o: o[1])
        comm, a2a, ar = [], [], []
        last_kind = None
        for name, start, end in inside:
            if "wait" not in name:
                last_kind = "a2a" if _A2A.search(name) else "ar" if _ALLREDUCE.search(name) else None
            comm.append((start, end))
            (a2a if last_kind == "a2a" else ar if last_kind == "ar" else []).append((start, end))
        exposed = merge_intervals(comm)
        compute = subtract([window], exposed)
        steps.append(_metrics(window, compute, comm, a2a, ar))
    return steps


def analyze_trace(trace: dict) -> list[StepMetrics]:
    """Per-step metrics of a Chrome trace written by ``profile_steps`` (GPU or CPU)."""
    events = _events(trace)
    if any(e.get("cat") == "kernel" for e in events):
        return _gpu_steps(events)
    return _cpu_steps(events)


def median_metrics(steps: list[StepMetrics]) -> StepMetrics:
    if not steps:
        raise ValueError("no profiled steps in the trace")
    fields = StepMetrics.__dataclass_fields__
    return StepMetrics(**{f: statistics.median(getattr(s, f) for s in steps) for f in fields})


def summarize(trace: dict) -> dict:
    """Medians over the profiled steps plus their count, ready for JSON."""
    steps = analyze_trace(trace)
    return {**median_metrics(steps).as_dict(), "profiled_steps": len(steps)}


def load_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def profile_steps(
    run_step: Callable[[int], None], *, steps: int, warmup: int, device: torch.device, trace_path: str | Path
) -> dict:
    """Run ``warmup`` plain steps, then ``steps`` profiled ones; write the Chrome trace and return it parsed."""
    for i in range(warmup):
        run_step(i)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            with torch.profiler.record_function(STEP_ANNOTATION):
                run_step(warmup + i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    trace_path = Path(trace_path)
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    if trace_path.suffix == ".gz":
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(plain))
            with open(plain, "rb") as src, gzip.open(trace_path, "wb") as dst:
                dst.write(src.read())
    else:
        prof.export_chrome_trace(str(trace_path))
    return load_trace(trace_path)


def _lane_spans(trace: dict, step_index: int) -> tuple[tuple[float, float], list, list]:
    events = _events(trace)
    gpu = any(e.get("cat") == "kernel" for e in events)
    windows = _step_windows(events, gpu=gpu)
    if not 0 <= step_index < len(windows):
        raise IndexError(f"trace has {len(windows)} profiled steps, asked for step {step_index}")
    window = _span(windows[step_index])
    if gpu:
        spans = _in_window([(e["name"], *_span(e)) for e in events if e.get("cat") == "kernel"], window)
        comm = [(n, s, e) for n, s, e in spans if _NCCL.search(n)]
        compute = [(n, s, e) for n, s, e in spans if not _NCCL.search(n)]
    else:
        thread = windows[step_index].get("tid")
        ops = [(e["name"], *_span(e)) for e in events if e.get("cat") == "cpu_op" and e.get("tid") == thread]
        spans = _in_window(ops, window)
        comm = [(n, s, e) for n, s, e in spans if _CPU_COMM.search(n)]
        compute = [(n, s, e) for n, s, e in spans if not _CPU_COMM.search(n)]
    return window, compute, comm


def plot_timeline(trace: dict, step_index: int, path: str | Path, title: str = "") -> None:
    """PNG of one profiled step: a compute lane and a communication lane (all-to-all / all-reduce / other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window, compute, comm = _lane_spans(trace, step_index)
    metrics = analyze_trace(trace)[step_index]
    origin = window[0]

    def bars(spans):
        return [((s - origin) / 1e3, (e - s) / 1e3) for _, s, e in spans]

    fig, ax = plt.subplots(figsize=(12, 2.4))
    ax.broken_barh(bars(compute), (10, 8), facecolors="tab:blue", label="compute")
    groups = (("all-to-all", _A2A, "tab:red"), ("all-reduce", _ALLREDUCE, "tab:green"))
    rest = list(comm)
    for label, pattern, colour in groups:
        chosen = [c for c in rest if pattern.search(c[0])]
        rest = [c for c in rest if not pattern.search(c[0])]
        ax.broken_barh(bars(chosen), (0, 8), facecolors=colour, label=label)
    ax.broken_barh(bars(rest), (0, 8), facecolors="tab:gray", label="other comm")
    ax.set_yticks([4, 14], labels=["comm", "compute"])
    ax.set_xlabel("ms from step start")
    ax.set_xlim(0, (window[1] - window[0]) / 1e3)
    heading = f"step {metrics.step_ms:.2f} ms, exposed comm {metrics.exposed_comm_ms:.2f} ms"
    ax.set_title(f"{title}  {heading}".strip())
    ax.legend(loc="upper right", fontsize="small", ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hta_exposed_comm_ms(trace_dir: str | Path, rank: int = 0) -> float | None:
    """Exposed communication per step by Holistic Trace Analysis, to cross-check ``analyze_trace``.

    HTA reports the percentage of all communication-kernel time overlapped by
    compute over the whole trace; we turn it into ms per step with our own
    comm time of the same trace. Returns None when HTA is not installed.
    """
    try:
        from hta.trace_analysis import TraceAnalysis
    except ImportError:
        return None
    trace_files = sorted(Path(trace_dir).glob(f"rank{rank}.json*"))
    if not trace_files:
        raise FileNotFoundError(f"no trace for rank {rank} in {trace_dir}")
    steps = analyze_trace(load_trace(trace_files[0]))
    if not steps:
        raise ValueError(f"{trace_files[0]} holds no profiled steps")
    try:
        frame = TraceAnalysis(trace_dir=str(trace_dir)).get_comm_comp_overlap(visualize=False)
        row = frame[frame["rank"] == rank]
        overlapped = float(row["comp_comm_overlap_pctg"].iloc[0]) / 100.0
    except Exception as err:  # HTA's own errors vary by version
        raise RuntimeError(f"HTA could not analyse {trace_dir}: {err}") from err
    comm_per_step = sum(s.comm_ms for s in steps) / len(steps)
    return (1.0 - overlapped) * comm_per_step
