"""Peak GPU memory of every step of a replayed (cudagraph) step, the capture step apart; one NCCL rank.

    python3 scripts/gpu/capture_memory.py [MODEL] [GATE] [STEPS]

Prints, per step, the peak allocated during it and what stays allocated after it, for the eager step, the
compiled executor and the cudagraph executor (warm-up steps, the capture step, replays), so the excess of a
graphed step's peak over the compiled one can be placed: in the capture step or in every replay.
"""

from __future__ import annotations

import os
import sys

import torch

from lancet.app.config import ModelSpec, RunConfig
from lancet.app.train import build_session
from lancet.capture.trace import capture_step
from lancet.runtime.dist import rank_runtime
from lancet.runtime.executor import make_executor

GIB = 2**30


def per_step_peaks(step, session, steps: int) -> list[tuple[float, float]]:
    """(peak GiB during, allocated GiB after) of each of ``steps`` steps, the optimizer applied after each."""
    device = session.runtime.device
    cuda = device.type == "cuda"  # on a CPU (a check of the script) the numbers are 0
    out = []
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        result = step(session.params, *session.batch(i))
        session.apply(result)
        del result
        if cuda:
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        out.append((peak / GIB, (torch.cuda.memory_allocated(device) if cuda else 0) / GIB))
    return out


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "gpt2_moe_nl12_m768_nh16_sl512_b48"
    gate = sys.argv[2] if len(sys.argv) > 2 else "switch"
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    for key, value in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    run = RunConfig(spec=ModelSpec(model=model, gate=gate), dtype="bf16", steps=steps)
    with rank_runtime(None) as runtime:
        session = build_session(run, runtime)
        graph = capture_step(session.train_step, *session.batch(0))
        variants = {"eager": session.train_step}
        for kind in ("compiled", "cudagraph") if runtime.device.type == "cuda" else ("compiled",):
            variants[kind] = make_executor(graph, kind)
        for name, step in variants.items():
            peaks = per_step_peaks(step, session, steps)
            cells = "  ".join(f"{peak:6.2f}/{after:5.2f}" for peak, after in peaks)
            print(f"{name:10s} peak/after GiB per step: {cells}", flush=True)
        if "cudagraph" in variants:
            graphed = variants["cudagraph"]
            print(f"cudagraph warm-up steps: {graphed.config.warmup}; the next step captures")
            reruns = graphed.capture_reruns()
            print("phases run uncaptured before their capture:", reruns or "none")


if __name__ == "__main__":
    main()
