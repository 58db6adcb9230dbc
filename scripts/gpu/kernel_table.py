"""Where GPU time goes per bench variant: kernel time by kernel family, per profiled step, from bench traces.

    python3 scripts/gpu/kernel_table.py TRACE_DIR [REFERENCE_VARIANT] [TOP] [--by-stem]

TRACE_DIR is a bench's --trace-dir (one folder per variant, rank0.json in each). Prints, per variant, the
kernels per step and the GPU time per step; then the TOP kernel families whose time per step differs most
from the reference variant's (default captured_cudagraph), and the phase gaps of each variant. With
--by-stem, kernels are grouped by ``kernel_stem`` instead: Inductor's fused kernels keep the names of the
ops they fuse (``triton_poi_fused_add_cat_1`` is ``triton_poi_fused_add_cat``), so the table says which ops
a variant adds.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from lancet.measure.kernel_names import kernel_family, kernel_stem
from lancet.measure.phases import phase_gaps
from lancet.measure.trace_metrics import _complete_events, _steps, load_trace


def per_step(trace_path: Path, key_of=kernel_family) -> tuple[Counter, Counter, int]:
    """(us per step by key, kernels per step by key, steps) of one trace; ``key_of`` names a kernel's group."""
    trace = load_trace(trace_path)
    steps = max(1, len(_steps(trace)))
    time, count = Counter(), Counter()
    for event in _complete_events(trace):
        if event.get("cat") != "kernel":
            continue
        key = key_of(event.get("name", "?"))[:80]
        time[key] += float(event.get("dur", 0.0)) / steps
        count[key] += 1 / steps
    return time, count, steps


def main() -> None:
    by_stem = "--by-stem" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--by-stem"]
    root = Path(args[0])
    reference = args[1] if len(args) > 1 else "captured_cudagraph"
    top = int(args[2]) if len(args) > 2 else 15
    variants = {p.parent.name: p for p in sorted(root.glob("*/rank0.json"))}
    tables = {name: per_step(path, kernel_stem if by_stem else kernel_family) for name, path in variants.items()}
    print("| variant | steps | kernels/step | kernel ms/step |")
    print("|---|---|---|---|")
    for name, (time, count, steps) in tables.items():
        print(f"| {name} | {steps} | {sum(count.values()):.0f} | {sum(time.values()) / 1e3:.2f} |")
    if reference not in tables:
        return
    ref_time, ref_count, _ = tables[reference]
    for name, (time, count, _) in tables.items():
        if name == reference:
            continue
        diffs = sorted(set(time) | set(ref_time), key=lambda k: -abs(time[k] - ref_time[k]))[:top]
        print(f"\n{name} - {reference}: kernel {'stems' if by_stem else 'families'} by |difference| in ms per step")
        print("| family | ms | ref ms | diff | n | ref n |")
        print("|---|---|---|---|---|---|")
        for key in diffs:
            print(f"| {key} | {time[key] / 1e3:.3f} | {ref_time[key] / 1e3:.3f} | "
                  f"{(time[key] - ref_time[key]) / 1e3:+.3f} | {count[key]:.0f} | {ref_count[key]:.0f} |")
    if by_stem:
        return
    for name, path in variants.items():
        for phase in ("forward", "backward"):
            print(f"gaps {name} {phase}: {phase_gaps(load_trace(path), phase, top=5)}")


if __name__ == "__main__":
    main()
