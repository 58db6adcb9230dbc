"""Profile training steps with torch.profiler and compute overlap metrics from the trace.

The metric is Lancet's *non-overlapped communication time*: the part of
communication time not covered by any compute. Every profiled step is one
``record_function("lancet/step")`` range, and the metrics are per step.

GPU traces (events of category ``kernel`` present):

- communication kernels are those whose name matches ``nccl``; all-to-all is
  NCCL's grouped send/recv (``SendRecv``) or an ``AllToAll`` kernel, all-reduce
  an ``AllReduce`` kernel;
- every other kernel is compute; memcpy/memset events are neither;
- a kernel belongs to the step whose host-side range launched it (runtime
  call and kernel share a correlation id); the step window runs from the
  step's first kernel (or its GPU-side annotation) to its last kernel;
- all kernels of the trace count together, whatever their stream or device
  (one rank per trace).

CPU traces (gloo): the step's thread blocks inside collective calls and their
waits, so communication is the time that thread spends in ``_c10d_functional``
/ ``c10d`` / gloo ops. A CPU trace cannot show communication hidden behind
compute, so all of it counts as exposed (``comm_ms == exposed_comm_ms``) and
compute is the rest of the step.
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lancet.sim.intervals import Interval, Intervals, merge_intervals, subtract, total_length

STEP_ANNOTATION = "lancet/step"

Span = tuple[str, float, float]  # (kind, start_us, end_us), kind one of the span kinds below

_NCCL = re.compile("nccl", re.IGNORECASE)
_A2A = re.compile("SendRecv|AllToAll|alltoall|all_to_all", re.IGNORECASE)
_ALLREDUCE = re.compile("AllReduce|all_reduce", re.IGNORECASE)
_CPU_COMM = re.compile(r"^_c10d_functional::|^c10d::|gloo", re.IGNORECASE)
_CPU_COLLECTIVE = re.compile(r"all_?to_?all|all_?reduce|all_?gather|reduce_?scatter|broadcast|send|recv|barrier")

# span kinds
COMPUTE, A2A, ALLREDUCE, OTHER_COMM = "compute", "all-to-all", "all-reduce", "other comm"
_US_PER_MS = 1e3


# ---------------------------------------------------------------- intervals


# ---------------------------------------------------------------- metrics


@dataclass(slots=True)
class StepMetrics:
    """Overlap metrics of one profiled step, all in milliseconds."""

    step_ms: float
    compute_ms: float
    comm_ms: float
    a2a_ms: float
    allreduce_ms: float
    exposed_comm_ms: float
    exposed_a2a_ms: float
    backward_a2a_ms: float = 0.0
    """All-to-all time after the forward's last all-to-all (0 unless the forward count is given)."""
    exposed_backward_a2a_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The metrics as a plain dict (JSON-ready)."""
        return asdict(self)


@dataclass(slots=True)
class _Step:
    """One step window of a trace with its classified spans (microseconds)."""

    window: Interval
    spans: list[Span]
    thread: object = None

    def intervals(self, *kinds: str) -> Intervals:
        """The spans of the given kinds, as intervals."""
        return [(s, e) for kind, s, e in self.spans if kind in kinds]


def _metrics(step: _Step, forward_a2a: int | None = None) -> StepMetrics:
    """StepMetrics of one classified step; ``forward_a2a``: how many all-to-alls the forward issues."""
    compute = merge_intervals(step.intervals(COMPUTE))
    comm = step.intervals(A2A, ALLREDUCE, OTHER_COMM)
    a2a = step.intervals(A2A)
    backward_a2a = sorted(a2a)[forward_a2a:] if forward_a2a is not None else []

    def ms(intervals: Intervals) -> float:
        return total_length(intervals) / _US_PER_MS

    return StepMetrics(
        backward_a2a_ms=ms(backward_a2a),
        exposed_backward_a2a_ms=ms(subtract(backward_a2a, compute)),
        step_ms=(step.window[1] - step.window[0]) / _US_PER_MS,
        compute_ms=ms(compute),
        comm_ms=ms(comm),
        a2a_ms=ms(a2a),
        allreduce_ms=ms(step.intervals(ALLREDUCE)),
        exposed_comm_ms=ms(subtract(comm, compute)),
        exposed_a2a_ms=ms(subtract(a2a, compute)),
    )


# ---------------------------------------------------------------- trace events


def _span(event: dict) -> Interval:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _complete_events(trace: dict) -> list[dict]:
    """The trace's complete ("X") events, which carry a start and a duration."""
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]


def _is_gpu_trace(events: list[dict]) -> bool:
    return any(e.get("cat") == "kernel" for e in events)


def _annotations(events: list[dict], category: str) -> list[dict]:
    return [e for e in events if e.get("cat") == category and e.get("name") == STEP_ANNOTATION]


def _gpu_windows(events: list[dict]) -> Intervals:
    """GPU-side step windows: per-stream annotation spans of one step joined by their External id."""
    groups: dict[object, Intervals] = {}
    for i, event in enumerate(_annotations(events, "gpu_user_annotation")):
        key = event.get("args", {}).get("External id", ("event", i))
        groups.setdefault(key, []).append(_span(event))
    windows = [(min(s for s, _ in spans), max(e for _, e in spans)) for spans in groups.values()]
    if not windows:
        windows = [_span(e) for e in _annotations(events, "user_annotation")]
    return sorted(windows)


def _by_window(spans: list[Span], windows: Intervals) -> list[list[Span]]:
    """Spans grouped by the window that holds their start (spans outside every window dropped)."""
    spans = sorted(spans, key=lambda span: span[1])
    starts = [span[1] for span in spans]
    return [spans[bisect.bisect_left(starts, lo) : bisect.bisect_left(starts, hi)] for lo, hi in windows]


def _kernel_kind(name: str) -> str:
    if not _NCCL.search(name):
        return COMPUTE
    if _A2A.search(name):
        return A2A
    return ALLREDUCE if _ALLREDUCE.search(name) else OTHER_COMM


def _launch_times(events: list[dict]) -> dict[object, float]:
    """Correlation id -> host time of the runtime call that launched the kernel."""
    return {
        e["args"]["correlation"]: float(e["ts"])
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }


def _gpu_steps(events: list[dict]) -> list[_Step]:
    """Kernels belong to the step whose host-side range launched them.

    The GPU-side annotation of a step covers only the streams that the range
    itself touched, so communication kernels still running when the compute
    stream finishes (the gradient all-reduces at the end of a step) would
    fall outside it; the launch time places them in their step. The window is
    the annotation's GPU span widened to every kernel of the step.
    """
    host_ranges = sorted((_span(e) for e in _annotations(events, "user_annotation")))
    launches = _launch_times(events)
    gpu_windows = _gpu_windows(events)
    if not host_ranges or not launches:
        kernels = [(_kernel_kind(e["name"]), *_span(e)) for e in events if e.get("cat") == "kernel"]
        return [_Step(window, spans) for window, spans in zip(gpu_windows, _by_window(kernels, gpu_windows))]
    per_step: list[list[Span]] = [[] for _ in host_ranges]
    starts = [lo for lo, _ in host_ranges]
    for e in events:
        if e.get("cat") != "kernel":
            continue
        launched = launches.get(e.get("args", {}).get("correlation"))
        if launched is None:
            continue
        i = bisect.bisect_right(starts, launched) - 1
        if i >= 0 and launched < host_ranges[i][1]:
            per_step[i].append((_kernel_kind(e["name"]), *_span(e)))
    steps = []
    for i, spans in enumerate(per_step):
        if not spans:
            continue
        lo = min(s for _, s, _ in spans)
        hi = max(e for _, _, e in spans)
        if i < len(gpu_windows):
            lo, hi = min(lo, gpu_windows[i][0]), max(hi, gpu_windows[i][1])
        steps.append(_Step((lo, hi), spans))
    return steps


def _collective_kind(name: str) -> str | None:
    """Kind of a collective launch op; None for waits and helper ops that launch nothing."""
    if "wait" in name.lower():
        return None
    if _A2A.search(name):
        return A2A
    if _ALLREDUCE.search(name):
        return ALLREDUCE
    return OTHER_COMM if _CPU_COLLECTIVE.search(name.lower()) else None


def _cpu_comm_spans(ops: list[tuple[str, float, float]]) -> list[Span]:
    """Collective ops of one thread, each wait attributed to the latest collective launched before it."""
    spans: list[Span] = []
    last = OTHER_COMM
    for name, start, end in sorted(ops, key=lambda op: op[1]):
        last = _collective_kind(name) or last
        spans.append((last, start, end))
    return spans


def _thread_ops(events: list[dict], thread: object) -> list[tuple[str, float, float]]:
    return [(e["name"], *_span(e)) for e in events if e.get("cat") == "cpu_op" and e.get("tid") == thread]


def _cpu_steps(events: list[dict]) -> list[_Step]:
    steps = []
    for annotation in sorted(_annotations(events, "user_annotation"), key=lambda e: float(e["ts"])):
        window, thread = _span(annotation), annotation.get("tid")
        ops = [op for op in _thread_ops(events, thread) if window[0] <= op[1] < window[1]]
        comm = _cpu_comm_spans([op for op in ops if _CPU_COMM.search(op[0])])
        idle = subtract([window], [(s, e) for _, s, e in comm])
        steps.append(_Step(window, comm + [(COMPUTE, s, e) for s, e in idle], thread))
    return steps


def _steps(trace: dict) -> list[_Step]:
    events = _complete_events(trace)
    return _gpu_steps(events) if _is_gpu_trace(events) else _cpu_steps(events)


def analyze_trace(trace: dict, forward_a2a: int | None = None) -> list[StepMetrics]:
    """Per-step overlap metrics of a Chrome trace from ``profile_steps`` (GPU or CPU), in step order.

    With ``forward_a2a`` (the number of all-to-alls the forward issues), the
    all-to-alls after the first ``forward_a2a`` of each step are reported as
    the backward's.
    """
    return [_metrics(step, forward_a2a) for step in _steps(trace)]


def median_metrics(steps: list[StepMetrics]) -> StepMetrics:
    """Field-wise median of several steps' metrics."""
    if not steps:
        raise ValueError("no profiled steps in the trace")
    return StepMetrics(**{f.name: statistics.median(getattr(s, f.name) for s in steps) for f in fields(StepMetrics)})


def summarize(trace: dict, forward_a2a: int | None = None) -> dict[str, float | int]:
    """Median metrics over the profiled steps plus their count (``steps``), ready for JSON."""
    steps = analyze_trace(trace, forward_a2a)
    return {**median_metrics(steps).as_dict(), "steps": len(steps)}


# ---------------------------------------------------------------- profiling


def load_trace(path: str | Path) -> dict:
    """Parse a Chrome trace file (``.json`` or gzip-compressed ``.json.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _export(prof: torch.profiler.profile, path: Path) -> None:
    """Write the profiler's Chrome trace to ``path``, gzip-compressed when it ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(plain))
        with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def profile_steps(
    run_step: Callable[[int], None], *, steps: int, warmup: int, device: torch.device, trace_path: str | Path
) -> dict:
    """Run ``warmup`` plain steps, then ``steps`` profiled ones; write the Chrome trace and return it parsed.

    ``run_step`` receives the global step index (warm-up steps first). Each
    profiled step is one ``STEP_ANNOTATION`` range that ends after a device
    synchronisation, so all of a step's GPU work lies inside its range.
    """
    for i in range(warmup):
        run_step(i)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for i in range(steps):
            with torch.profiler.record_function(STEP_ANNOTATION):
                run_step(warmup + i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    trace_path = Path(trace_path)
    _export(prof, trace_path)
    return load_trace(trace_path)


# ---------------------------------------------------------------- timeline plot


def _top_level(ops: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Ops not nested inside another op of the list."""
    top: list[tuple[str, float, float]] = []
    for op in sorted(ops, key=lambda op: (op[1], -op[2])):
        if not top or op[1] >= top[-1][2]:
            top.append(op)
    return top


def _cpu_compute_spans(events: list[dict], step: _Step) -> list[Span]:
    """Top-level non-collective ops of the step's thread, with the collective time cut out."""
    lo, hi = step.window
    ops = [op for op in _thread_ops(events, step.thread) if lo <= op[1] < hi and not _CPU_COMM.search(op[0])]
    busy = subtract([(s, e) for _, s, e in _top_level(ops)], step.intervals(A2A, ALLREDUCE, OTHER_COMM))
    return [(COMPUTE, s, e) for s, e in busy]


def _plot_spans(trace: dict, step_index: int) -> tuple[_Step, list[Span]]:
    """The chosen step and the spans to draw for it."""
    events = _complete_events(trace)
    steps = _steps(trace)
    if not 0 <= step_index < len(steps):
        raise IndexError(f"trace has {len(steps)} profiled steps, asked for step {step_index}")
    step = steps[step_index]
    if _is_gpu_trace(events):
        return step, step.spans
    comm = [span for span in step.spans if span[0] != COMPUTE]
    return step, _cpu_compute_spans(events, step) + comm


_COLOURS = {COMPUTE: "tab:blue", A2A: "tab:red", ALLREDUCE: "tab:green", OTHER_COMM: "tab:gray"}


def plot_timeline(trace: dict, step_index: int, path: str | Path) -> None:
    """Write a PNG of one profiled step: a compute lane and a communication lane, x in ms from step start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step, spans = _plot_spans(trace, step_index)
    metrics = _metrics(step)
    origin = step.window[0]
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for kind, colour in _COLOURS.items():
        bars = [((s - origin) / _US_PER_MS, (e - s) / _US_PER_MS) for k, s, e in spans if k == kind]
        lane = (10, 8) if kind == COMPUTE else (0, 8)
        if bars:
            ax.broken_barh(bars, lane, facecolors=colour, label=kind)
    ax.set_yticks([4, 14], labels=["communication", "compute"])
    ax.set_ylim(-2, 26)
    ax.set_xlim(0, metrics.step_ms)
    ax.set_xlabel("ms from step start")
    ax.set_title(
        f"step {step_index}: {metrics.step_ms:.2f} ms, exposed comm {metrics.exposed_comm_ms:.2f} ms "
        f"(all-to-all {metrics.exposed_a2a_ms:.2f} ms)"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize="small", ncols=len(_COLOURS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- HTA cross-check


def _rank_trace(trace_dir: Path, rank: int) -> Path:
    """The trace of ``rank`` in ``trace_dir``: ``rank{rank}.json[.gz]``, else the one its distributedInfo names."""
    named = sorted(trace_dir.glob(f"rank{rank}.json*"))
    if named:
        return named[0]
    for path in sorted([*trace_dir.glob("*.json"), *trace_dir.glob("*.json.gz")]):
        if load_trace(path).get("distributedInfo", {}).get("rank") == rank:
            return path
    raise FileNotFoundError(f"no trace of rank {rank} in {trace_dir}")


def _comm_kernel_us(trace: dict) -> float:
    """Union length of all communication kernels in the trace, steps or not (HTA's denominator)."""
    kernels = (e for e in _complete_events(trace) if e.get("cat") == "kernel")
    return total_length(_span(e) for e in kernels if _NCCL.search(e["name"]))


def hta_exposed_comm_ms(trace_dir: str | Path, rank: int = 0) -> float | None:
    """Exposed communication per step according to Holistic Trace Analysis, to cross-check ``analyze_trace``.

    HTA reports, per rank, the percentage of communication-kernel time
    overlapped by compute kernels over the whole trace (its denominator is the
    merged length of all communication kernels). This returns
    ``(1 - pct / 100) * comm_kernel_time / steps`` from the rank's trace: a
    per-step average to compare with the median ``exposed_comm_ms`` of
    ``summarize``. Returns None when HTA is not installed. HTA needs GPU
    traces that hold ``"distributedInfo": {"rank": N}``, which torch writes
    when torch.distributed is initialised.
    """
    try:
        from hta.trace_analysis import TraceAnalysis
    except ImportError:
        return None
    trace_dir = Path(trace_dir)
    trace = load_trace(_rank_trace(trace_dir, rank))
    steps = analyze_trace(trace)
    if not steps or not _is_gpu_trace(_complete_events(trace)):
        raise ValueError(f"the rank {rank} trace in {trace_dir} holds no profiled GPU steps")
    try:
        overlap = TraceAnalysis(trace_dir=str(trace_dir)).get_comm_comp_overlap(visualize=False)
        pct = float(overlap.loc[overlap["rank"] == rank, "comp_comm_overlap_pctg"].iloc[0])
    except Exception as err:  # HTA's failures differ between versions
        raise RuntimeError(f"Holistic Trace Analysis failed on {trace_dir} (rank {rank}): {err}") from err
    return (1.0 - pct / 100.0) * _comm_kernel_us(trace) / _US_PER_MS / len(steps)
