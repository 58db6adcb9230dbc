"""Find what stops a step from being captured as CUDA graphs: the executor's capture on a few small steps, then
host syncs under ``torch.cuda.set_sync_debug_mode``, then every node of the failing graph captured alone.

    PYTHONPATH=.:src python3 scripts/gpu/capture_probe.py [PROBE ...]    # one GPU, one NCCL rank

PROBE: fp32_m64, bf16_m64, fp32_m256 (the executor's capture of that step), syncs (host syncs of the fp32 m64
step, interpreted and compiled), lone (each of its nodes captured alone); default: all. A failed capture can
leave CUDA state behind (the RNG generator stays in capture mode), so run one probe per process to compare
them. Prints one line per probe (OK / FAIL and the error), then the nodes whose lone capture failed, with the
source line the node came from.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import fx

from lancet.capture.trace import capture_step
from lancet.graph.roles import Role, node_role
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.executor import make_executor
from lancet.step.train_step import TrainStep
from tests.gpu.test_cudagraph_executor import _batches

DEVICE = torch.device("cuda", 0)


def small_step(group, model: str, dtype: torch.dtype | None) -> TrainStep:
    cfg = model_config(model, vocab_size=97, gate=GateConfig(kind="switch"))
    torch.manual_seed(0)
    return TrainStep(build_model(cfg, group, device=DEVICE), group, autocast_dtype=dtype)


def graphed_steps(step: TrainStep, batches, label: str) -> bool:
    graph = capture_step(step, *batches[0])
    executor = make_executor(graph, "cudagraph")
    params = [p.detach().clone() for p in step.parameters()]
    try:
        for tokens, targets in batches:
            executor(params, tokens, targets)
        torch.cuda.synchronize()
        print(f"OK   {label}: {executor.kind}, {executor.steps} steps", flush=True)
        return True
    except Exception as error:  # noqa: BLE001 (report and go on)
        print(f"FAIL {label}: {type(error).__name__}: {str(error)[:400]}", flush=True)
        traceback.print_exc(limit=8)
        return False


def host_syncs(step: TrainStep, batches, kind: str) -> None:
    """Run one step of ``kind`` with CUDA sync debugging on; print each synchronising call's warning."""
    graph = capture_step(step, *batches[0])
    executor = make_executor(graph, kind)
    params = [p.detach().clone() for p in step.parameters()]
    executor(params, *batches[0])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            executor(params, *batches[1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"host syncs in one {kind} step: {len(syncs)}", flush=True)
    for w in syncs[:10]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:200]}", flush=True)


class _LoneCapture(fx.Interpreter):
    """Runs the graph eagerly; each compute node is also captured alone into a throwaway CUDA graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.failures: list[str] = []
        self.stream = torch.cuda.Stream()

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.op != "call_function" or node_role(node) not in (Role.COMPUTE, None):
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), (args, kwargs))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                node.target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            where = (node.meta.get("stack_trace") or "").strip().splitlines()[-2:]
            self.failures.append(f"{node.name} ({node.target}): {type(error).__name__}: {str(error)[:160]} "
                                 f"{' | '.join(where)}")
        return out


def lone_captures(step: TrainStep, batches) -> None:
    train_graph = capture_step(step, *batches[0])
    probe = _LoneCapture(train_graph.gm)
    probe.run(*[p.detach().clone() for p in step.parameters()], *batches[0])
    torch.cuda.synchronize()
    print(f"nodes whose lone capture failed: {len(probe.failures)}", flush=True)
    for line in probe.failures[:20]:
        print(f"  {line}", flush=True)


def main() -> None:
    torch.cuda.set_device(DEVICE)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                device_id=DEVICE)
        group = dist.group.WORLD
        batches = _batches(97, 4, 16)
        small = "gpt2_moe_nl2_m64_nh4_sl16_b4"
        steps = {"fp32_m64": (small, None), "bf16_m64": (small, torch.bfloat16),
                 "fp32_m256": ("gpt2_moe_nl2_m256_nh4_sl16_b4", None)}
        probes = sys.argv[1:] or [*steps, "syncs", "lone"]
        results = {}
        for probe in probes:
            if probe in steps:
                model, dtype = steps[probe]
                results[probe] = graphed_steps(small_step(group, model, dtype), batches, f"{probe} switch")
            elif probe == "syncs":
                for kind in ("interpret", "compiled"):
                    try:
                        host_syncs(small_step(group, small, None), batches, kind)
                    except Exception as error:  # noqa: BLE001
                        print(f"sync probe {kind}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            elif probe == "lone":
                try:
                    lone_captures(small_step(group, small, None), batches)
                except Exception as error:  # noqa: BLE001
                    print(f"lone-capture probe: {type(error).__name__}: {str(error)[:300]}", flush=True)
                    traceback.print_exc(limit=6)
            else:
                raise SystemExit(f"unknown probe {probe!r}")
        print("summary:", ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in results.items()), flush=True)
        dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
