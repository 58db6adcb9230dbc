"""``lancet timeline``: a PNG of one step from a profiler trace or a predicted (simulator) trace, or of one phase
(forward, backward) of several measured traces side by side."""

from __future__ import annotations

from pathlib import Path

from lancet.measure.phase_picture import NoPhaseError, plot_phases
from lancet.measure.trace_metrics import load_trace, plot_timeline


def is_predicted(trace: dict) -> bool:
    return any(
        e.get("ph") == "M" and "(predicted)" in str(e.get("args", {}).get("name", "")) for e in trace["traceEvents"]
    )


def plot_predicted(trace: dict, path: str | Path, title: str = "predicted") -> None:
    """PNG of a simulator Chrome trace in the same two-lane layout as measured timelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    end = max((e["ts"] + e["dur"] for e in events), default=0.0) / 1e3
    fig, ax = plt.subplots(figsize=(12, 2.6))
    compute = [(e["ts"] / 1e3, e["dur"] / 1e3) for e in events if e["pid"] == 0]
    ax.broken_barh(compute, (10, 8), facecolors="tab:blue", label="compute")
    for label, key, colour in (("all-to-all", "all_to_all", "tab:red"), ("all-reduce", "all_reduce", "tab:green")):
        bars = [(e["ts"] / 1e3, e["dur"] / 1e3) for e in events if e["pid"] == 1 and key in e.get("cat", "")]
        if bars:
            ax.broken_barh(bars, (0, 8), facecolors=colour, label=label)
    ax.set_yticks([4, 14], labels=["communication", "compute"])
    ax.set_ylim(-2, 26)
    ax.set_xlim(0, end)
    ax.set_xlabel("ms from step start")
    ax.set_title(f"{title}: {end:.2f} ms")
    ax.legend(loc="upper right", fontsize="small", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class TraceError(ValueError):
    """The file is not a Chrome trace this tool can draw."""


def _load(trace_path: str) -> dict:
    """A Chrome trace from ``trace_path``; FileNotFoundError or TraceError with the reason otherwise."""
    try:
        trace = load_trace(trace_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"trace file {trace_path!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError, EOFError) as err:  # gzip errors are OSError/EOFError
        raise TraceError(f"{trace_path} is not a readable Chrome trace ({type(err).__name__}: {err})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError(f"{trace_path} is not a Chrome trace (no traceEvents list)")
    return trace


def render(trace_path: str, out_path: str, step: int = 0) -> None:
    """Draw ``step`` of a measured trace, or a predicted trace, to ``out_path``; TraceError for anything else."""
    trace = _load(trace_path)
    try:
        if is_predicted(trace):
            plot_predicted(trace, out_path)
        else:
            plot_timeline(trace, step, out_path)
    except (KeyError, TypeError, AttributeError) as err:
        raise TraceError(f"{trace_path} is not a Chrome trace this tool can draw (missing {err})") from None


def trace_label(trace_path: str) -> str:
    """A bench trace's variant (its folder's name, ``<trace-dir>/<variant>/rank0.json``), else the file's name."""
    path = Path(trace_path)
    return path.parent.name if path.name.startswith("rank") and path.parent.name else path.name


def render_phase(trace_paths: list[str], out_path: str, phase: str, labels: list[str] | None = None) -> None:
    """Draw ``phase`` of each measured trace, one row per trace on one time axis (rows named by ``labels``, else
    ``trace_label``); TraceError for a trace without it."""
    labels = labels or [trace_label(path) for path in trace_paths]
    traces = [(label, _load(path)) for label, path in zip(labels, trace_paths)]
    try:
        plot_phases(traces, phase, out_path)
    except NoPhaseError as err:
        raise TraceError(f"{err} (a GPU trace of a lancet step is needed)") from None
