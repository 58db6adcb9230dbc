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


def _phase_windows(events: list[dict], phase: str) -> list[tuple[float, float]]:
    """(window, idle) of every marked instance of ``phase`` that launched kernels, in time order."""
    name = PHASE_ANNOTATION.format(phase=phase)
    ranges = sorted(_span(e) for e in events if e.get("cat") == "user_annotation" and e.get("name") == name)
    if not ranges:
        return []
    launches = _launch_times(events)
    starts = [lo for lo, _ in ranges]
    spans: list[Intervals] = [[] for _ in ranges]
    for event in events:
        if event.get("cat") != "kernel":
            continue
        launched = launches.get(event.get("args", {}).get("correlation"))
        if launched is None:
            continue
        i = bisect.bisect_right(starts, launched) - 1
        if i >= 0 and launched < ranges[i][1]:
            spans[i].append(_span(event))
    return [_idle_us(s) for s in spans if s]


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
