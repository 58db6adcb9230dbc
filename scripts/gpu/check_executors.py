"""Check the executors against each other on one GPU, and time them (small models, one NCCL rank).

    python3 scripts/gpu/check_executors.py [--out DIR]

For each case (a small GPT-2 MoE with the switch gate, the same with dropless top-2,
fp32): the captured step under interpret, compiled and cudagraph (when the step can
be graphed), several steps from the same parameters with an SGD update between
them. Prints, per executor: the largest relative difference of loss and gradients
from the interpreted graph, the median step time, the compile report, and whether
the compiled executor issued collectives and regions in the graph's order. Writes
``check_executors.json`` under ``--out`` (default ``$OUT`` or ``out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.cudagraph import why_not_graphed
from lancet.runtime.executor import make_executor
from lancet.runtime.record import expected_execution, record_execution
from lancet.step.train_step import TrainStep

MODEL = "gpt2_moe_nl4_m256_nh4_sl128_b8"
STEPS = 8


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _run(executor, start: list[torch.Tensor], batches) -> tuple[list, list[float]]:
    params = [p.clone() for p in start]
    results, times = [], []
    for tokens, targets in batches:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        result = executor(params, tokens, targets)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
        results.append((result.loss.clone(), [g.clone() for g in result.grads]))
        with torch.no_grad():
            for p, g in zip(params, result.grads):
                p.sub_(0.05 * g)
    return results, times


def _case(gate: GateConfig, group) -> dict:
    device = torch.device("cuda", 0)
    cfg = model_config(MODEL, vocab_size=1024, gate=gate)
    step = TrainStep(build_model(cfg, group, device=device, seed=1), group)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=2)
    batches = [tuple(t.to(device) for t in source.batch(s, 0)) for s in range(STEPS)]
    graph = capture_step(step, *batches[0])
    start = [p.detach().clone() for p in step.parameters()]
    reference, _ = _run(make_executor(graph, "interpret"), start, batches)
    row = {"gate": gate.kind, "graphable": why_not_graphed(graph.graph, device) or "yes", "executors": {}}
    for kind in ("interpret", "compiled", "cudagraph"):
        executor = make_executor(graph, kind)
        begin = time.perf_counter()
        results, times = _run(executor, start, batches)
        worst = max(max(_relative(gl, wl), *(_relative(g, w) for g, w in zip(gg, wg)))
                    for (gl, gg), (wl, wg) in zip(results, reference))
        entry = {"ran_as": executor.kind, "note": executor.note, "max_rel_diff": worst,
                 "first_steps_s": time.perf_counter() - begin, "step_ms": statistics.median(times[3:]),
                 "compile": executor.compile_report.to_json()}
        if executor.kind == "compiled":
            params = [p.clone() for p in start]
            with record_execution() as executed:
                executor(params, *batches[0])
            entry["order_kept"] = executed == expected_execution(
                graph.graph, executor.program.regions, set(executor.program.calls))
        row["executors"][kind] = entry
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=device)
    rows = [_case(GateConfig(kind="switch"), dist.group.WORLD), _case(GateConfig(kind="topk", topk=2), dist.group.WORLD)]
    dist.destroy_process_group()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "check_executors.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{MODEL} fp32, one GPU; max rel diff against the interpreted graph over {STEPS} steps")
    print("| gate | asked | ran as | max rel diff | step ms | first steps s | compiled regions | compile s | "
          "FX cache hit/miss | order kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for kind, e in row["executors"].items():
            c = e["compile"]
            cache = f"{c['cache'].get('fxgraph_cache_hit', 0)}/{c['cache'].get('fxgraph_cache_miss', 0)}"
            print(f"| {row['gate']} | {kind} | {e['ran_as']} | {e['max_rel_diff']:.2e} | {e['step_ms']:.2f} | "
                  f"{e['first_steps_s']:.1f} | {c['compiled_regions']}/{c['regions']} | {c['seconds']:.1f} | {cache} | "
                  f"{e.get('order_kept', '')} |")
        if row["graphable"] != "yes":
            print(f"  {row['gate']}: not graphable: {row['graphable']}")


if __name__ == "__main__":
    main()
