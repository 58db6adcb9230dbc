"""Which capture rewrite a failing region compile depends on: a small bf16 MoE step on one NCCL rank, compiled with
each of lancet's capture rewrites on and off (attention seeds, parameter casts, inlined dispatch ops).

    python3 scripts/gpu/region_compile_probe.py [GATE]
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

import lancet.capture.trace as trace
import lancet.runtime.compile as compile_mod
from lancet.app.data import BatchSource
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.executor import make_executor
from lancet.step.train_step import TrainStep


def attempt(name: str, gate: str, group) -> None:
    cfg = model_config("gpt2_moe_nl2_m64_nh4_sl16_b4", vocab_size=97, gate=GateConfig(kind=gate))
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    step = TrainStep(build_model(cfg, group, device=device), group, autocast_dtype=torch.bfloat16)
    source = BatchSource(batch_size=4, seq_len=16, vocab_size=97, seed=1)
    batch = tuple(t.cuda() for t in source.batch(0, 0))
    graph = trace.capture_step(step, *batch)
    targets = sorted({str(n.target) for n in graph.graph.nodes if "attention" in str(n.target)})
    try:
        executor = make_executor(graph, "compiled")
        loss = executor(step.parameters(), *batch).loss.item()
        print(f"{name}: ok, loss {loss:.4f}; attention ops {targets}", flush=True)
    except Exception as error:  # noqa: BLE001 - the probe reports every failure
        print(f"{name}: FAILED {type(error).__name__}: {str(error).splitlines()[0]}; attention ops {targets}")
        traceback.print_exc(limit=-16)


def _reraise(self, call, args, error):
    raise error


def main() -> None:
    gate = sys.argv[1] if len(sys.argv) > 1 else "switch"
    compile_mod.RegionCompiler._run_as_traced = _reraise  # a failed compile raises here (no fallback)
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 's')}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        group = dist.group.WORLD
        attempt("as shipped", gate, group)
        seeds, casts, inline = trace.detach_attention_seeds, trace.batch_parameter_casts, compile_mod.inline_lancet_ops
        trace.detach_attention_seeds = lambda gm: 0
        attempt("without attention seeds", gate, group)
        trace.detach_attention_seeds = seeds
        trace.batch_parameter_casts = lambda gm, n: 0
        attempt("without parameter casts", gate, group)
        trace.batch_parameter_casts = casts
        compile_mod.inline_lancet_ops = lambda module, args: module
        attempt("without inlined ops", gate, group)
        compile_mod.inline_lancet_ops = inline
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
