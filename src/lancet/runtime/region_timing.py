"""Measure a step under the compiled or CUDA-graph executor, region by region (``lancet profile --executor``).

The executor's program runs through an ``fx.Interpreter`` on real batches;
every compiled region is re-run ``reps`` times on its real inputs, queued behind
a spin kernel on the GPU (``lancet.cost.clock``), giving its device time with
its kernels back to back and the host time of one call. The whole step's host
issue time under the executor is measured too (a graph replay, for
``cudagraph``). Medians over batches, then over ranks, so every rank derives the
same plan. The result prices plans for what actually runs
(``lancet.cost.executor``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import fx

from lancet.capture.trace import TrainGraph
from lancet.cost.clock import Clock
from lancet.cost.executor import ExecutorProfile, RegionTime
from lancet.runtime.executor import StepExecutor, make_executor
from lancet.runtime.program import PhaseCall, RegionCall


class _PhaseTimer(fx.Interpreter):
    """Runs one phase module, timing every compiled region call on its real inputs."""

    def __init__(self, module: fx.GraphModule, clock: Clock, reps: int, times: dict[int, list]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.clock, self.reps, self.times = clock, reps, times

    def call_module(self, target, args, kwargs):
        call = self.fetch_attr(target)
        if isinstance(call, RegionCall):
            run = lambda: call(*args)  # noqa: E731
            run()
            self.times.setdefault(call.region.index, []).append(self.clock.time_ms(run, self.reps, queue_ahead=True))
        return super().call_module(target, args, kwargs)


class _StepTimer(fx.Interpreter):
    """Runs a program's top module, each phase through a ``_PhaseTimer``."""

    def __init__(self, top: fx.GraphModule, clock: Clock, reps: int, times: dict[int, list]) -> None:
        super().__init__(top, garbage_collect_values=True)
        self.clock, self.reps, self.times = clock, reps, times

    def call_module(self, target, args, kwargs):
        phase = self.fetch_attr(target)
        if isinstance(phase, PhaseCall):
            return _PhaseTimer(phase.module, self.clock, self.reps, self.times).run(*args)
        return super().call_module(target, args, kwargs)


def executor_issue_ms(executor: StepExecutor, inputs: list[torch.Tensor], device: torch.device,
                      runs: int = 3) -> float:
    """Host ms to issue one step through ``executor`` (median of ``runs``; the device drains between runs),
    less the time blocked in host waits for split sizes."""
    from lancet.moe.host_copy import blocked_seconds

    params, (tokens, targets) = inputs[:-2], inputs[-2:]
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        blocked, begin = blocked_seconds(), time.perf_counter()
        executor(params, tokens, targets)
        times.append((time.perf_counter() - begin - (blocked_seconds() - blocked)) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(times)


def _agree(mine: dict, group: dist.ProcessGroup | None) -> list[dict]:
    if group is None or dist.get_world_size(group) == 1:
        return [mine]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return gathered


def profile_executor(
    train_graph: TrainGraph, kind: str | None, batches: list[list[torch.Tensor]], device: torch.device,
    group: dist.ProcessGroup | None, node_ms: dict[str, float], *, reps: int = 5,
    progress: Callable | None = None,
) -> ExecutorProfile | None:
    """Region timings of ``train_graph`` under executor ``kind`` (None: the default for the graph and device);
    None when that executor is ``interpret`` (nothing compiled to time). ``node_ms``: the eager node times."""
    executor = make_executor(train_graph, kind, progress=progress)
    if executor.kind == "interpret":
        return None
    first = batches[0]
    for _ in range(executor.config.warmup + 1):  # compile, warm up, and (cudagraph) capture
        executor(first[:-2], *first[-2:])
    clock = Clock(device)
    times: dict[int, list] = {}
    with torch.no_grad():
        for inputs in batches:
            _StepTimer(executor.program.top, clock, reps, times).run(*inputs)
    mine = {
        "regions": {i: (statistics.median(d for d, _ in v), statistics.median(h for _, h in v)) for i, v in times.items()},
        "issue": executor_issue_ms(executor, first, device),
    }
    gathered = _agree(mine, group)
    regions = []
    for index, call in sorted(executor.program.calls.items()):
        device_ms = statistics.median(g["regions"][index][0] for g in gathered)
        host_ms = statistics.median(g["regions"][index][1] for g in gathered)
        eager_ms = sum(node_ms.get(name, 0.0) for name in call.region.names)
        regions.append(RegionTime(index, call.region.phase, call.region.names, device_ms, host_ms, eager_ms))
    return ExecutorProfile(kind=executor.kind, regions=regions, issue_ms=statistics.median(g["issue"] for g in gathered),
                           compile=executor.compile_report.to_json(), min_kernels=executor.config.min_kernels)
