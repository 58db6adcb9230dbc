"""The kernels of one phase of a bench trace, in order, with the idle gap before each; then a count by family.

    python3 scripts/gpu/phase_kernels.py TRACE.json [PHASE] [LIMIT]

PHASE is forward (default) or backward; the last marked instance of it in the trace is listed, at most
LIMIT rows (default 200). The family table covers the whole instance. For finding what a phase could fuse.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from lancet.measure.kernel_names import kernel_family as family, kernel_stem
from lancet.measure.phases import _phase_kernels
from lancet.measure.trace_metrics import _complete_events, _span, load_trace


def main() -> None:
    trace_path = Path(sys.argv[1])
    phase = sys.argv[2] if len(sys.argv) > 2 else "forward"
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    instances = _phase_kernels(_complete_events(load_trace(trace_path)), phase)
    if not instances:
        sys.exit(f"{trace_path}: no kernels in a marked {phase} phase")
    kernels = sorted(instances[-1], key=lambda e: _span(e)[0])
    end = _span(kernels[0])[0]
    time, count, idle = Counter(), Counter(), Counter()
    print("| # | kernel | us | gap before us |\n|---|---|---|---|")
    for i, event in enumerate(kernels):
        start, stop = _span(event)
        gap = max(0.0, start - end)
        end = max(end, stop)
        key = family(event.get("name", "?"))
        time[key] += stop - start
        count[key] += 1
        idle[key] += gap
        if i < limit:
            print(f"| {i} | {kernel_stem(event.get('name', '?'))[:90]} | {stop - start:.1f} | {gap:.1f} |")
    print(f"\n{len(kernels)} kernels, {sum(time.values()) / 1e3:.2f} ms busy, {sum(idle.values()) / 1e3:.3f} ms idle")
    print("| family | n | ms | idle before, ms |\n|---|---|---|---|")
    for key, n in count.most_common():
        print(f"| {key} | {n} | {time[key] / 1e3:.3f} | {idle[key] / 1e3:.3f} |")


if __name__ == "__main__":
    main()
