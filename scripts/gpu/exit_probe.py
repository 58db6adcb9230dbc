"""Where a rank that replayed CUDA graphs spends its exit: one process, one NCCL rank, a small MoE step.

    python3 scripts/gpu/exit_probe.py keep|release [profile]

Runs 5 cudagraph steps (under torch.profiler with ``profile``), then leaves: ``keep`` exits with the
executor still referenced (as a worker whose locals die at return), ``release`` drops it and collects
garbage first. Prints a timestamp after each stage of the exit, the last one from atexit.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time

import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.dist import rank_runtime
from lancet.runtime.executor import make_executor
from lancet.step.train_step import TrainStep

BEGIN = time.perf_counter()


def stage(what: str) -> None:
    print(f"[{time.perf_counter() - BEGIN:7.2f} s] {what}", flush=True)


def main() -> None:
    mode, profile = sys.argv[1], "profile" in sys.argv[2:]
    for key, value in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    atexit.register(stage, "atexit (interpreter shutdown begins)")
    with rank_runtime(None) as runtime:
        cfg = model_config("gpt2_moe_nl2_m64_nh4_sl16_b4", vocab_size=97, gate=GateConfig(kind="switch"))
        step = TrainStep(build_model(cfg, runtime.group, device=runtime.device), runtime.group)
        source = BatchSource(batch_size=4, seq_len=16, vocab_size=97, seed=1)
        tokens, targets = (t.to(runtime.device) for t in source.batch(0, 0))
        executor = make_executor(capture_step(step, tokens, targets), "cudagraph")
        params = step.parameters()
        stage(f"executor {executor.kind} built")
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]):
                for _ in range(5):
                    executor(params, tokens, targets)
                torch.cuda.synchronize()
        else:
            for _ in range(5):
                executor(params, tokens, targets)
        torch.cuda.synchronize()
        stage("5 steps done")
        if mode == "release":
            del executor
            gc.collect()
            torch.cuda.synchronize()
            stage("executor released")
        stage("leaving rank_runtime (barrier, destroy_process_group)")
    stage("process group destroyed")


if __name__ == "__main__":
    main()
