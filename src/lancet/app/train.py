"""The training loop run on every rank: build, step, apply gradients, report.

Rank 0 prints per-step loss and tokens/s with a progress display and, when
asked, writes one JSON object per step to a metrics file.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lancet.plan.artifact import RunIdentity
from lancet.app.config import RunConfig
from lancet.app.data import make_batch_source
from lancet.runtime.dist import Runtime, rank_runtime
from lancet.app.faults import maybe_inject_fault
from lancet.app.gc_policy import ScheduledCollection
from lancet.models import GPT2MoEConfig, build_model
from lancet.step.train_step import StepResult, TrainStep

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(slots=True)
class Session:
    """A built model, its step function, optimizer and data on one rank."""

    runtime: Runtime
    model_cfg: GPT2MoEConfig
    train_step: TrainStep
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    batches: object
    identity: RunIdentity

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets = self.batches.batch(step, self.runtime.rank)
        return tokens.to(self.runtime.device), targets.to(self.runtime.device)

    def apply(self, result: StepResult) -> None:
        for param, grad in zip(self.params, result.grads):
            param.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.01)
    return torch.optim.AdamW(params, lr=lr)


def build_session(run: RunConfig, runtime: Runtime) -> Session:
    model_cfg = run.validate(runtime.world_size)
    model = build_model(model_cfg, runtime.group, device=runtime.device, seed=run.seed)
    train_step = TrainStep(model, runtime.group, autocast_dtype=AUTOCAST[run.dtype])
    params = train_step.parameters()
    batches = make_batch_source(run.data, model_cfg.batch_size, model_cfg.seq_len, model_cfg.vocab_size, run.seed)
    optimizer = make_optimizer(run.optimizer, params, run.learning_rate)
    identity = run.identity(runtime.world_size, runtime.device)
    return Session(runtime, model_cfg, train_step, params, optimizer, batches, identity)


def make_runner(run: RunConfig, session: Session):
    """The step function for ``run.mode``: the eager TrainStep or the captured graph."""
    if run.mode == "eager":
        return session.train_step
    from lancet.runtime.captured import captured_runner

    return captured_runner(session, plan_path=run.plan, variant=run.plan_variant)


def global_mean(value: torch.Tensor, group: dist.ProcessGroup) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value.item() / dist.get_world_size(group)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
    )


def train_worker(run: RunConfig) -> list[dict]:
    """Entry point of one rank; returns the per-step records (on every rank)."""
    with rank_runtime(run.network, run.emulation()) as runtime:
        return _train(run, runtime)


def _train(run: RunConfig, runtime: Runtime) -> list[dict]:
    session = build_session(run, runtime)
    runner = make_runner(run, session)
    cfg = session.model_cfg
    tokens_per_step = cfg.tokens_per_rank * runtime.world_size
    console = Console(stderr=False, quiet=not runtime.is_main)
    records: list[dict] = []
    with ExitStack() as stack:
        metrics = open(run.metrics_jsonl, "w") if (run.metrics_jsonl and runtime.is_main) else None
        if metrics is not None:
            stack.enter_context(metrics)
        collection = stack.enter_context(ScheduledCollection(run.gc_every))
        progress = stack.enter_context(_progress(console))
        task = progress.add_task("train", total=run.steps, status="")
        for step in range(run.steps):
            maybe_inject_fault(runtime.rank, step)
            tokens, targets = session.batch(step)
            runtime.synchronize()
            start = time.perf_counter()
            result = runner(session.params, tokens, targets)
            session.apply(result)
            runtime.synchronize()
            seconds = time.perf_counter() - start
            record = {
                "step": step,
                "loss": global_mean(result.loss, runtime.group),
                "step_ms": seconds * 1e3,
                "tokens_per_s": tokens_per_step / seconds,
                "dropped_fraction": _dropped_fraction(result),
            }
            if runtime.device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
            records.append(record)
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
            progress.console.print(f"step {step:>5}  {status}  {record['step_ms']:.1f} ms")
            progress.update(task, advance=1, status=status)
            collection.after_step(step)
    return records


def _dropped_fraction(result: StepResult) -> float:
    if not result.keep:
        return 0.0
    kept = torch.stack([k.sum() for k in result.keep]).sum().item()  # one host read per step
    total = sum(k.numel() for k in result.keep)
    return 1.0 - kept / total
