"""Charts of measured results (PNG, matplotlib): a metric per variant per regime, predicted vs measured.

Inputs are plain records taken from bench JSON; each chart is one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Point:
    """One bench row: which comparison it belongs to, its regime and variant, and the values charted."""

    group: str
    regime: str
    variant: str
    step_ms: float
    exposed_comm_ms: float | None = None
    exposed_a2a_ms: float | None = None
    predicted_ms: float | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars_per_regime(points: Sequence[Point], metric: str, ylabel: str, path: str | Path) -> bool:
    """One panel per group: bars of ``metric`` per variant, grouped by regime. False when nothing has the metric."""
    points = [p for p in points if getattr(p, metric) is not None]
    if not points:
        return False
    plt = _pyplot()
    groups = list(dict.fromkeys(p.group for p in points))
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        mine = [p for p in points if p.group == group]
        regimes = list(dict.fromkeys(p.regime for p in mine))
        variants = list(dict.fromkeys(p.variant for p in mine))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = {p.regime: getattr(p, metric) for p in mine if p.variant == variant}
            xs = [r + (i - (len(variants) - 1) / 2) * width for r in range(len(regimes)) if regimes[r] in values]
            ax.bar(xs, [values[r] for r in regimes if r in values], width, label=variant)
        ax.set_xticks(range(len(regimes)), regimes)
        ax.set_ylabel(ylabel)
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7, ncols=min(len(variants), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def predicted_vs_measured(points: Sequence[Point], path: str | Path) -> bool:
    """Scatter of predicted against measured step time, with y = x and a ±10% band. False without predictions."""
    points = [p for p in points if p.predicted_ms is not None]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    markers = dict(zip(dict.fromkeys(p.variant for p in points), "osD^v<>pP*Xh"))
    colours = dict(zip(dict.fromkeys(p.regime for p in points), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for p in points:
        ax.scatter(p.step_ms, p.predicted_ms, marker=markers.get(p.variant, "o"), color=colours.get(p.regime, "k"), s=26)
    for variant, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=variant)
    for regime, colour in colours.items():
        ax.scatter([], [], marker="s", color=colour, label=regime)
    top = max(max(p.step_ms, p.predicted_ms) for p in points) * 1.1
    ax.plot([0, top], [0, top], color="black", linewidth=0.8)
    ax.fill_between([0, top], [0, 0.9 * top], [0, 1.1 * top], color="grey", alpha=0.15, label="±10%")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured step ms")
    ax.set_ylabel("predicted step ms")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
