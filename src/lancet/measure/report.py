"""Markdown tables of measured results: a bench's variants, several regimes side by side, comm curves.

Input is the JSON the commands write (``lancet bench --json``, ``lancet profile-comm``); nothing is
re-measured. These are the tables of docs/results.md.
"""

from __future__ import annotations

from collections.abc import Sequence

BENCH_COLUMNS = ("variant", "executor", "step ms", "q1-q3 ms", "x eager", "tokens/s", "a2a ms", "exposed a2a", "vs {baseline}",
                 "exposed bwd a2a", "exposed comm", "two-lane bound", "predicted ms", "predicted / measured")
COMM_SIZES_MIB = (8, 64, 256)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def within_noise(a: dict, b: dict) -> bool:
    """Whether two variants' step times are within each other's spread: their quartile ranges overlap."""
    qa, qb = a.get("quartiles_ms") or [a["step_ms"]] * 2, b.get("quartiles_ms") or [b["step_ms"]] * 2
    return qa[0] <= qb[1] and qb[0] <= qa[1]


def speedup(row: dict, eager: dict | None) -> str:
    """Eager step time over this variant's, marked ``~`` when the difference is within the spread (noise)."""
    if eager is None:
        return ""
    ratio = f"{eager['step_ms'] / row['step_ms']:.3f}"
    return ratio if row is eager or not within_noise(row, eager) else f"{ratio} ~"


def bench_table(rows: list[dict], baseline: str = "captured") -> str:
    """One row per variant of a bench JSON's ``results``: step time, exposed communication, prediction."""
    eager = next((r for r in rows if r["variant"] == "eager"), None)
    base = next((r for r in rows if r["variant"] == baseline), None)
    base_a2a = base["trace"].get("exposed_a2a_ms") if base and base.get("trace") else None
    head = [c.format(baseline=baseline) for c in BENCH_COLUMNS]
    rounds = max(len(r.get("round_ms") or ()) for r in rows)
    if rounds > 1:
        head.append("round medians")
    body = []
    for r in rows:
        t, p = r.get("trace") or {}, r.get("predicted")
        cells = [
            r["variant"], r.get("executor") or "", f"{r['step_ms']:.1f}",
            "-".join(f"{q:.1f}" for q in r["quartiles_ms"]) if r.get("quartiles_ms") else "",
            speedup(r, eager),
            f"{r['tokens_per_s']:,.0f}",
            _ms(t, "a2a_ms"), _ms(t, "exposed_a2a_ms"),
            f"{t['exposed_a2a_ms'] - base_a2a:+.1f}" if t and base_a2a is not None else "",
            _ms(t, "exposed_backward_a2a_ms"), _ms(t, "exposed_comm_ms"),
            f"{max(t['compute_ms'], t['comm_ms']):.1f}" if t else "",
            f"{p['makespan_ms']:.1f}" if p else "", f"{p['makespan_ms'] / r['step_ms'] - 1:+.1%}" if p else "",
        ]
        if rounds > 1:
            cells.append(" / ".join(f"{ms:.1f}" for ms in r.get("round_ms") or ()))
        body.append(cells)
    return markdown_table(head, body)


def _ms(trace: dict, key: str) -> str:
    return f"{trace[key]:.1f}" if trace and key in trace else ""


def regime_table(cells: dict[tuple[str, str], dict]) -> str:
    """Variants (rows) by regimes (columns): step ms and speed-up over eager of the same regime.

    ``cells`` maps (variant, regime) to a bench result row; order of first appearance is kept.
    """
    variants = list(dict.fromkeys(v for v, _ in cells))
    regimes = list(dict.fromkeys(r for _, r in cells))
    body = []
    for variant in variants:
        row = [variant]
        for regime in regimes:
            result, eager = cells.get((variant, regime)), cells.get(("eager", regime))
            if result is None:
                row.append("")
                continue
            speedup = f" ({eager['step_ms'] / result['step_ms']:.2f}x)" if eager else ""
            row.append(f"{result['step_ms']:.1f}{speedup}")
        body.append(row)
    return markdown_table(["variant", *(f"{r} step ms" for r in regimes)], body)


def comm_table(curves: dict[str, dict]) -> str:
    """All-to-all time at 8/64/256 MiB, compute slowdown beside comm and issue time, per regime.

    ``curves`` maps a regime label to the ``comm`` payload of a profile-comm file; sizes beyond
    the measured sweep are left empty.
    """
    head = ["regime", *(f"all-to-all {s} MiB" for s in COMM_SIZES_MIB), "compute slowdown beside comm",
            "collective issue ms"]
    body = []
    for regime, comm in curves.items():
        points = comm["curves"].get("all_to_all", [])
        cells = [regime, *(_at(points, size * 2**20) for size in COMM_SIZES_MIB)]
        cells += [f"{comm.get('contention', 1.0):.3f}", f"{comm.get('issue_ms', 0.0):.3f}"]
        body.append(cells)
    return markdown_table(head, body)


def _at(points: list[list[float]], nbytes: float) -> str:
    """Piecewise-linear time (ms) at ``nbytes``, empty outside the measured range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= nbytes <= x1:
            return f"{y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0):.3f} ms"
    if points and points[-1][0] == nbytes:
        return f"{points[-1][1]:.3f} ms"
    return ""
