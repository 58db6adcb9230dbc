"""Markdown table of a `lancet bench --json` file (the tables in docs/results.md).

    python scripts/bench_markdown.py bench.json [--baseline captured]

"x eager" carries "~" where the variant's quartile range of step times overlaps eager's (noise).
"""

from __future__ import annotations

import argparse
import json

from lancet.app.bench import speedup


def table(path: str, baseline: str) -> str:
    data = json.load(open(path))
    rows = data["results"]
    eager = next((r for r in rows if r["variant"] == "eager"), None)
    base = next((r for r in rows if r["variant"] == baseline), None)
    base_a2a = base["trace"].get("exposed_a2a_ms") if base and base["trace"] else None
    head = ["variant", "step ms", "q1-q3 ms", "x eager", "tokens/s", "a2a ms", "exposed a2a", f"vs {baseline}", "exposed bwd a2a",
            "exposed comm", "two-lane bound", "predicted ms", "predicted / measured"]
    rounds = max(len(r.get("round_ms") or ()) for r in rows)
    if rounds > 1:
        head.append("round medians")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t, p = r["trace"], r.get("predicted")
        cells = [
            r["variant"], f"{r['step_ms']:.1f}",
            "-".join(f"{q:.1f}" for q in r["quartiles_ms"]) if r.get("quartiles_ms") else "",
            speedup(r, eager),
            f"{r['tokens_per_s']:,.0f}",
            f"{t['a2a_ms']:.1f}" if t else "", f"{t['exposed_a2a_ms']:.1f}" if t else "",
            f"{t['exposed_a2a_ms'] - base_a2a:+.1f}" if t and base_a2a is not None else "",
            f"{t['exposed_backward_a2a_ms']:.1f}" if t else "", f"{t['exposed_comm_ms']:.1f}" if t else "",
            f"{max(t['compute_ms'], t['comm_ms']):.1f}" if t else "",
            f"{p['makespan_ms']:.1f}" if p else "", f"{p['makespan_ms'] / r['step_ms'] - 1:+.1%}" if p else "",
        ]
        if rounds > 1:
            cells.append(" / ".join(f"{ms:.1f}" for ms in r["round_ms"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_json")
    parser.add_argument("--baseline", default="captured", help="variant the exposed all-to-all change is measured from")
    args = parser.parse_args()
    print(table(args.bench_json, args.baseline))
