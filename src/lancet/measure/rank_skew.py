"""Split each collective's kernel time into waiting for other ranks and moving data.

A NCCL kernel starts on a rank when that rank's stream reaches it, but data
moves only once every rank's kernel has started: the time a kernel spends
before the last rank arrives is waiting (rank skew), the rest is transfer.
From every rank's GPU trace of the same profiled steps (one host, one clock),
the i-th communication kernel of a step is the same collective on every rank
(all ranks issue collectives in the same order). The GPUs' clocks, as the
trace shows them, can be apart by tens of microseconds, more than the transfer
of a small collective; a collective ends on every rank at about the same moment
(when the last data lands), so each rank's clock is first shifted by the median
over collectives of its kernel ends minus rank 0's. Then per collective:

    arrival  = max over ranks of kernel start
    wait_r   = arrival - start_r            (0 for the last rank to arrive)
    transfer = median over ranks of (end_r - arrival)

``python -m lancet.measure.rank_skew TRACE_DIR`` prints the sums per step, per kind
(all-to-all, all-reduce) and rank, for traces written by ``lancet bench``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lancet.measure.trace_metrics import _US_PER_MS, COMPUTE, _complete_events, _gpu_steps, load_trace

_TOLERANCE_US = 5.0
"""Clock disagreement allowed between ranks before an end counts as early."""


@dataclass(slots=True)
class KindSkew:
    """Sums over one kind of collective, per profiled step, in ms."""

    count: int = 0
    kernel_ms: list[float] = field(default_factory=list)
    """Per rank: time inside this kind's kernels."""
    wait_ms: list[float] = field(default_factory=list)
    """Per rank: of that, time before the last rank's kernel started."""
    transfer_ms: float = 0.0
    last_arrivals: list[int] = field(default_factory=list)
    """Per rank: how many of these collectives it was the last to reach."""
    early_ends: int = 0
    """Collectives (all steps) whose kernel ended on some rank before the last rank's started: the split above
    does not hold for them (seen on NVLink, where a rank's part of a transfer can complete without the peer's
    kernel); a count far from 0 means the waiting and transfer columns are not to be trusted."""

    @classmethod
    def empty(cls, ranks: int) -> KindSkew:
        return cls(kernel_ms=[0.0] * ranks, wait_ms=[0.0] * ranks, last_arrivals=[0] * ranks)


def _comm_kernels(trace: dict) -> list[list[tuple[str, float, float]]]:
    """Per profiled step, the communication kernels (kind, start us, end us) in start order."""
    steps = _gpu_steps(_complete_events(trace))
    return [sorted((s for s in step.spans if s[0] != COMPUTE), key=lambda s: s[1]) for step in steps]


def _matched(traces: list[dict]) -> list[list[tuple[tuple[str, float, float], ...]]]:
    """Per step, each collective as the tuple of its kernels on every rank."""
    per_rank = [_comm_kernels(t) for t in traces]
    steps = {len(r) for r in per_rank}
    if len(steps) != 1 or steps == {0}:
        raise ValueError(f"the traces hold different numbers of profiled GPU steps: {[len(r) for r in per_rank]}")
    matched = []
    for step in range(steps.pop()):
        kernels = [r[step] for r in per_rank]
        if len({len(k) for k in kernels}) != 1:
            raise ValueError(f"step {step}: ranks ran different numbers of collectives {[len(k) for k in kernels]}")
        matched.append(list(zip(*kernels)))
    return matched


def _aligned(matched: list[list[tuple]]) -> list[list[tuple]]:
    """The kernels with each rank's clock shifted so that collectives end together (median over collectives)."""
    collectives = [same for step in matched for same in step]
    ranks = len(collectives[0])
    offsets = [statistics.median(same[r][2] - same[0][2] for same in collectives) for r in range(ranks)]
    return [
        [tuple((kind, start - offsets[r], end - offsets[r]) for r, (kind, start, end) in enumerate(same)) for same in step]
        for step in matched
    ]


def collective_skew(traces: list[dict]) -> dict[str, KindSkew]:
    """Per kind of collective, waiting and transfer summed per step (averaged over the profiled steps)."""
    matched = _aligned(_matched(traces))
    ranks = len(traces)
    num_steps = len(matched)
    result: dict[str, KindSkew] = {}
    for step, collectives in enumerate(matched):
        for same in collectives:
            kinds = {kind for kind, _, _ in same}
            if len(kinds) != 1:
                raise ValueError(f"step {step}: ranks disagree on a collective's kind: {sorted(kinds)}")
            skew = result.setdefault(kinds.pop(), KindSkew.empty(ranks))
            arrival = max(start for _, start, _ in same)
            skew.count += 1
            skew.transfer_ms += statistics.median(end - arrival for _, _, end in same) / _US_PER_MS
            skew.last_arrivals[max(range(ranks), key=lambda r: same[r][1])] += 1
            skew.early_ends += min(end for _, _, end in same) < arrival - _TOLERANCE_US
            for r, (_, start, end) in enumerate(same):
                skew.kernel_ms[r] += (end - start) / _US_PER_MS
                skew.wait_ms[r] += (arrival - start) / _US_PER_MS
    for skew in result.values():  # per step
        skew.count //= num_steps
        skew.transfer_ms /= num_steps
        skew.kernel_ms = [v / num_steps for v in skew.kernel_ms]
        skew.wait_ms = [v / num_steps for v in skew.wait_ms]
    return result


def rank_traces(trace_dir: str | Path) -> list[dict]:
    """``rank0.json[.gz]``, ``rank1.json[.gz]``, ... of a ``lancet bench`` variant folder."""
    trace_dir = Path(trace_dir)
    traces = []
    while paths := sorted(trace_dir.glob(f"rank{len(traces)}.json*")):
        traces.append(load_trace(paths[0]))
    if len(traces) < 2:
        raise FileNotFoundError(f"{trace_dir} holds {len(traces)} rank traces (rank0.json, rank1.json, ...); need 2+")
    return traces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lancet.measure.rank_skew", description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dirs", nargs="+", help="folders of rank traces (one per variant, from lancet bench)")
    args = parser.parse_args(argv)
    print(f"{'traces':<28} {'kind':<11} {'per step':>8} {'kernel ms per rank':>24} {'waiting ms per rank':>24} "
          f"{'transfer ms':>11}  last to arrive  early ends")
    for trace_dir in args.trace_dirs:
        for kind, skew in sorted(collective_skew(rank_traces(trace_dir)).items()):
            print(f"{Path(trace_dir).name:<28} {kind:<11} {skew.count:>8} "
                  f"{' '.join(f'{v:7.2f}' for v in skew.kernel_ms):>24} {' '.join(f'{v:7.2f}' for v in skew.wait_ms):>24} "
                  f"{skew.transfer_ms:>11.2f}  {str(skew.last_arrivals):<14}  {skew.early_ends}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
