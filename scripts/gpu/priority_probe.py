"""What batch-prioritized capacity routing costs a replayed graph, by method (one GPU).

    python3 scripts/gpu/priority_probe.py [--tokens 12288,24576,6144] [--experts 2] [--methods argsort,runs-1024]
        [--json OUT.json]

The padded dispatch's ``capacity_slots`` for the batch-prioritized gate needs, per expert, the ``C``
tokens of highest top-1 probability (ties to the earlier token). Four ways, each checked equal (kept set)
to the first on the probe's data, each run 12 times in a row (one per MoE layer of nl24) in a CUDA graph:
``argsort`` (a stable sort of all probabilities, ``LANCET_PRIORITY_POSITIONS=sort``), ``kthvalue``
(each expert's C-th largest probability by a radix select, then ties in token order), ``topk`` (the same
threshold from an unsorted top-k), ``pairwise`` (each token counts the tokens of its expert ahead of it: one
T x T Inductor reduction, nothing materialised), ``runs-N`` (``lancet.moe.priority_positions``: one unique
int64 key per token, runs of N keys sorted each in one thread block, positions counted by one searchsorted).
Each method runs under ``torch.compile``. Per method: kernels per call, busy time per call (profiled), replay
time per call (CUDA events, no profiler).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lancet.moe.gates import capacity, positions_by_argsort
from lancet.moe.priority_positions import positions_by_priority

CALLS = 12


def by_argsort(expert_T, prob_T, num_experts, cap):
    return positions_by_argsort(expert_T, prob_T, num_experts) < cap


def _keep_from_threshold(expert_T, prob_T, num_experts, cap, threshold_E):
    mine_ET = expert_T[None, :] == torch.arange(num_experts, device=expert_T.device)[:, None]
    threshold_T = threshold_E[expert_T]
    above_T = prob_T > threshold_T
    tie_ET = mine_ET & (prob_T == threshold_T)[None, :]
    tie_rank_T = (torch.cumsum(tie_ET.to(torch.int64), dim=1) * tie_ET).sum(0) - 1
    room_T = cap - (mine_ET & above_T[None, :]).sum(1)[expert_T]
    return above_T | ((prob_T == threshold_T) & (tie_rank_T < room_T))


def by_kthvalue(expert_T, prob_T, num_experts, cap):
    mine_ET = expert_T[None, :] == torch.arange(num_experts, device=expert_T.device)[:, None]
    negated_ET = torch.where(mine_ET, -prob_T[None, :], float("inf"))
    threshold_E = -negated_ET.kthvalue(min(cap, expert_T.shape[0]), dim=1).values
    return _keep_from_threshold(expert_T, prob_T, num_experts, cap, threshold_E)


def by_topk(expert_T, prob_T, num_experts, cap):
    mine_ET = expert_T[None, :] == torch.arange(num_experts, device=expert_T.device)[:, None]
    masked_ET = torch.where(mine_ET, prob_T[None, :], float("-inf"))
    threshold_E = masked_ET.topk(min(cap, expert_T.shape[0]), dim=1, sorted=False).values.amin(dim=1)
    return _keep_from_threshold(expert_T, prob_T, num_experts, cap, threshold_E)


def by_pairwise(expert_T, prob_T, num_experts, cap):
    index_T = torch.arange(expert_T.shape[0], device=expert_T.device)
    earlier_TT = index_T[None, :] < index_T[:, None]
    ahead_TT = (prob_T[None, :] > prob_T[:, None]) | ((prob_T[None, :] == prob_T[:, None]) & earlier_TT)
    return ((expert_T[None, :] == expert_T[:, None]) & ahead_TT).sum(dim=1) < cap


def by_runs(run_length):
    def keep(expert_T, prob_T, num_experts, cap):
        return positions_by_priority(expert_T, prob_T, num_experts, run_length) < cap
    return keep


def _measure(fn, expert_T, prob_T, num_experts, cap):
    def chain():
        out = None
        for _ in range(CALLS):
            out = fn(expert_T, prob_T, num_experts, cap)
        return out
    for _ in range(3):
        chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    return {"kernels_per_call": len(kernels) / CALLS, "busy_us_per_call": busy / CALLS,
            "replay_us_per_call": statistics.median(times) / CALLS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="12288,24576,6144")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--methods", default="argsort,runs-512,runs-1024,runs-2048,runs-4096",
                        help="argsort, kthvalue, topk, pairwise, runs-N (comma-separated)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    fixed = {"argsort": by_argsort, "kthvalue": by_kthvalue, "topk": by_topk, "pairwise": by_pairwise}
    methods = {name: fixed[name] if name in fixed else by_runs(int(name.removeprefix("runs-")))
               for name in args.methods.split(",")}
    # Every (tokens, method) pair recompiles the same function; past the default limit (8) torch.compile would
    # run the rest uncompiled, as it did for run 19's 49152-token rows.
    torch._dynamo.config.recompile_limit = 256
    rows = []
    print("| tokens | method | equal kept set | kernels per call | busy us per call | replay us per call |")
    print("|---|---|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        expert_T = torch.randint(0, args.experts, (tokens,), device="cuda")
        prob_T = torch.softmax(torch.randn(tokens, args.experts, device="cuda"), -1).amax(-1)
        prob_T[::7] = prob_T[3]  # ties at the threshold's neighbourhood
        cap = capacity(tokens, args.experts, 1.0)
        reference = by_argsort(expert_T, prob_T, args.experts, cap)
        for name, fn in methods.items():
            run = torch.compile(fn, dynamic=False)
            try:
                equal = bool(torch.equal(run(expert_T, prob_T, args.experts, cap), reference))
                row = {"tokens": tokens, "method": name, "equal": equal,
                       **_measure(run, expert_T, prob_T, args.experts, cap)}
            except Exception as err:  # a method this build cannot graph: say so, go on
                print(f"| {tokens} | {name} | failed: {str(err).splitlines()[0][:120]} |", flush=True)
                continue
            rows.append(row)
            print(f"| {tokens} | {name} | {equal} | {row['kernels_per_call']:.1f} | {row['busy_us_per_call']:.1f} | "
                  f"{row['replay_us_per_call']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
