"""A picture of one phase (forward or backward) of several traces on one time axis.

Each trace gets two lanes, compute and communication, holding the kernels of the last profiled
instance of the phase (kernels belong to a phase as ``lancet.measure.phases`` assigns them), x in
ms from the phase's first kernel (bars at least 1/800 of the axis wide). White space in a lane is
time in which no kernel of that lane ran; each row's label gives the phase's GPU window and its
idle share.
"""

from __future__ import annotations

from pathlib import Path

from lancet.measure.phases import _idle_us, _phase_kernels
from lancet.measure.trace_metrics import _COLOURS, _US_PER_MS, COMPUTE, _complete_events, _kernel_kind, _span

_MIN_BAR_SHARE = 800
"""Bars are at least 1/800 of the axis wide, so that short kernels (a one-rank all-to-all) still show."""


class NoPhaseError(ValueError):
    """A trace holds no kernels launched inside the asked-for phase."""


def phase_spans(trace: dict, phase: str) -> list[tuple[str, float, float]]:
    """(kind, start ms, end ms) of every kernel of the trace's last instance of ``phase``, from its first kernel."""
    instances = _phase_kernels(_complete_events(trace), phase)
    if not instances:
        raise NoPhaseError(f"the trace has no GPU kernels launched inside a lancet/{phase} range")
    spans = [(_kernel_kind(e.get("name", "")), *_span(e)) for e in instances[-1]]
    origin = min(s for _, s, _ in spans)
    return [(kind, (s - origin) / _US_PER_MS, (e - origin) / _US_PER_MS) for kind, s, e in spans]


def plot_phases(traces: list[tuple[str, dict]], phase: str, path: str | Path) -> None:
    """Write a PNG with one row per (label, trace): the last profiled ``phase`` of each, on one ms axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for label, trace in traces:
        try:
            rows.append((label, phase_spans(trace, phase)))
        except NoPhaseError as err:
            raise NoPhaseError(f"{label}: {err}") from None
    end = max(e for _, spans in rows for _, _, e in spans)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 1.1 * len(rows)))
    ticks, labels, seen = [], [], set()
    for i, (label, spans) in enumerate(reversed(rows)):
        base = 30 * i
        window, idle = _idle_us([(s, e) for _, s, e in spans])
        for kind, colour in _COLOURS.items():
            bars = [(s, max(e - s, end / _MIN_BAR_SHARE)) for k, s, e in spans if k == kind]
            if bars:
                lane = (base + 12, 10) if kind == COMPUTE else (base, 10)
                ax.broken_barh(bars, lane, facecolors=colour, label=None if kind in seen else kind)
                seen.add(kind)
        ticks += [base + 5, base + 17]
        idle_share = 100 * idle / window if window else 0.0
        labels += ["comm", f"{label}\n{window:.2f} ms, idle {idle:.2f} ({idle_share:.1f}%)"]
    ax.set_yticks(ticks, labels=labels, fontsize="small")
    ax.set_xlim(0, end)
    ax.set_xlabel(f"ms from the {phase}'s first kernel")
    ax.set_title(f"{phase}: kernels of the last profiled step (white: no kernel running in that lane)")
    ax.legend(loc="upper right", fontsize="small", ncols=len(_COLOURS))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
