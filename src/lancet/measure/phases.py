"""GPU time and GPU idle time per phase (forward, backward) and per step, from a profiler trace.

Every step function marks its phases with ``record_function`` ranges
(``lancet/forward``, ``lancet/backward``: the eager ``TrainStep`` and every
executor of a captured graph). A kernel belongs to the phase whose host range
launched it (the runtime call and the kernel share a correlation id; for a
CUDA-graph replay, the graph launch); a phase's GPU window runs from its first
kernel's start to its last kernel's end, and its idle time is the part of that
window in which no kernel (compute or communication) runs: the device waiting
for the host. The step's idle time is the same over all kernels of the step
(steps as ``lancet.measure.trace_metrics`` finds them).

GPU traces only: on a CPU the host does the work, and idle time means nothing.
Steps whose phases carry no marks (a step under ``torch.compile``, whose tracer
drops profiler ranges) give no phase figures.
"""

from __future__ import annotations

import bisect
import statistics
from collections import Counter

from lancet.measure.kernel_names import kernel_family
from lancet.measure.trace_metrics import _complete_events, _is_gpu_trace, _launch_times, _span, _steps
from lancet.sim.intervals import Intervals, merge_intervals, total_length
from lancet.step.train_step import PHASE_ANNOTATION

PHASES = ("forward", "backward")
_US_PER_MS = 1e3


def _idle_us(spans: Intervals) -> tuple[float, float]:
    """(window, idle) in microseconds of a set of kernel spans: first start to last end, and the gaps."""
    merged = merge_intervals(spans)
    window = merged[-1][1] - merged[0][0]
    return window, window - total_length(merged)


def _phase_kernels(events: list[dict], phase: str) -> list[list[dict]]:
    """The kernels of every marked instance of ``phase`` that launched any, in time order."""
    name = PHASE_ANNOTATION.format(phase=phase)
    ranges = sorted(_span(e) for e in events if e.get("cat") == "user_annotation" and e.get("name") == name)
    if not ranges:
        return []
    launches = _launch_times(events)
    starts = [lo for lo, _ in ranges]
    kernels: list[list[dict]] = [[] for _ in ranges]
    for event in events:
        if event.get("cat") != "kernel":
            continue
        launched = launches.get(event.get("args", {}).get("correlation"))
        if launched is None:
            continue
        i = bisect.bisect_right(starts, launched) - 1
        if i >= 0 and launched < ranges[i][1]:
            kernels[i].append(event)
    return [k for k in kernels if k]


def _phase_windows(events: list[dict], phase: str) -> list[tuple[float, float]]:
    """(window, idle) of every marked instance of ``phase`` that launched kernels, in time order."""
    return [_idle_us([_span(e) for e in kernels]) for kernels in _phase_kernels(events, phase)]


def _gaps(kernels: list[dict]) -> list[tuple[float, str, str]]:
    """(gap us, kernel before, kernel after) for every stretch of one phase instance with no kernel running."""
    ordered = sorted(kernels, key=lambda e: _span(e)[0])
    gaps = []
    end, last = _span(ordered[0])[1], ordered[0]
    for event in ordered[1:]:
        start, stop = _span(event)
        if start > end:
            gaps.append((start - end, last.get("name", "?"), event.get("name", "?")))
        if stop > end:
            end, last = stop, event
    return gaps


def phase_gaps(trace: dict, phase: str = "forward", small_us: float = 10.0, top: int = 3) -> dict:
    """Where a phase's idle time lies ({} without a GPU trace or marks): per instance, medians over the
    profiled steps of the number of gaps, of the idle in gaps under ``small_us`` (the device running
    kernel after kernel, each waiting for the last) and in longer gaps (waits for the host, another
    stream or an event); the ``top`` longest gaps of all instances with the kernels on either side; and
    ``small_by_next``: the idle in gaps under ``small_us`` per family of the kernel that waited
    (``kernel_family``), as [ms per instance, gaps per instance, family], the 2 * ``top`` largest."""
    events = _complete_events(trace)
    if not _is_gpu_trace(events):
        return {}
    per_instance = [_gaps(kernels) for kernels in _phase_kernels(events, phase)]
    if not per_instance:
        return {}
    longest = sorted((g for gaps in per_instance for g in gaps), reverse=True)[:top]

    def median_ms(short: bool) -> float:
        return statistics.median(sum(d for d, _, _ in gaps if (d < small_us) == short) for gaps in per_instance) / 1e3

    return {
        "gaps": statistics.median(len(gaps) for gaps in per_instance),
        "small_gaps_ms": median_ms(True),
        "long_gaps_ms": median_ms(False),
        "longest": [[d / _US_PER_MS, before, after] for d, before, after in longest],
        "small_by_next": _small_gaps_by_next_family(per_instance, small_us, 2 * top),
    }


def _small_gaps_by_next_family(per_instance: list[list[tuple[float, str, str]]], small_us: float,
                               top: int) -> list[list]:
    idle_us, count = Counter(), Counter()
    for gaps in per_instance:
        for duration, _, after in gaps:
            if duration < small_us:
                family = kernel_family(after)
                idle_us[family] += duration
                count[family] += 1
    n = len(per_instance)
    return [[us / n / _US_PER_MS, count[name] / n, name] for name, us in idle_us.most_common(top)]


def phase_metrics(trace: dict) -> dict[str, float]:
    """Medians over the profiled steps, in ms: ``{phase}_gpu_ms`` and ``{phase}_idle_ms`` for each marked phase,
    and ``step_idle_ms`` (GPU traces; {} for a CPU trace)."""
    events = _complete_events(trace)
    if not _is_gpu_trace(events):
        return {}
    out: dict[str, float] = {}
    for phase in PHASES:
        windows = _phase_windows(events, phase)
        if windows:
            out[f"{phase}_gpu_ms"] = statistics.median(w for w, _ in windows) / _US_PER_MS
            out[f"{phase}_idle_ms"] = statistics.median(i for _, i in windows) / _US_PER_MS
    steps = [step for step in _steps(trace) if step.spans]
    if steps:
        idle = [_idle_us([(s, e) for _, s, e in step.spans])[1] for step in steps]
        out["step_idle_ms"] = statistics.median(idle) / _US_PER_MS
    return out
