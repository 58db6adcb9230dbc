"""What a run shows a person: a header, stage messages, per-step progress, a final summary (rank 0 only).

One style for every command: on a terminal a progress bar with plain lines above
it; elsewhere (a log file, a pipe, CI) plain lines only, one per step or pass,
with no control characters.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lancet.plan.artifact import gate_description


def console_for(is_main: bool) -> Console:
    """Rank 0's console (standard output); other ranks print nothing."""
    return Console(quiet=not is_main, highlight=False, soft_wrap=True)


def model_size(params: list[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def header_line(run, session, step: str | None = None) -> str:
    """Device, ranks, model and its size, gate, data, precision and step kind (``step``: what runs), in one line."""
    runtime, cfg = session.runtime, session.model_cfg
    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "CPU"
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    local = model_size(session.params)
    experts = (f"{cfg.total_experts(runtime.world_size)} experts, gate {gate_description(cfg.gate)}"
               if hasattr(cfg, "gate")
               else f"{cfg.experts} expert-local parameters")  # a --model factory's model
    if step is None:
        step = run.mode if run.plan is None else f"{run.mode}, plan {run.plan} ({run.plan_variant})"
    return (f"lancet: {runtime.world_size} ranks on {device} ({backend}); model {cfg.name}, {_count(local)} parameters "
            f"per rank, {experts}; data {run.data}, batch {cfg.batch_size}x{cfg.seq_len} "
            f"per rank; {run.dtype}, {run.optimizer}; step: {step}")


def summary_line(records: list[dict], seconds: float, first_step: int) -> str:
    """Steps run, total time, mean tokens/s, dropped fraction, last loss."""
    if not records:
        return f"no steps run (started at step {first_step}); {seconds:.1f} s"
    timed = records[1:] or records  # the first step includes one-time work (allocation, warm-up)
    tokens_per_s = statistics.fmean(r["tokens_per_s"] for r in timed)
    dropped = statistics.fmean(r["dropped_fraction"] for r in records)
    skipped = sum(1 for r in records if r.get("skipped"))
    last = records[-1]
    return (f"done: steps {records[0]['step']}-{last['step']} in {seconds:.1f} s; mean {tokens_per_s:,.0f} tokens/s "
            f"(after the first step); dropped {dropped:.1%} of token choices; final loss {last['loss']:.4f}"
            + (f"; {skipped} steps skipped (non-finite)" if skipped else ""))


def step_line(record: dict) -> str:
    skipped = "  [skipped: non-finite]" if record.get("skipped") else ""
    return (f"step {record['step']:>5}  loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"{record['step_ms']:.1f} ms{skipped}")


class StepProgress:
    """Per-step lines, with a bar below them on a terminal; ``advance(line)`` after every step."""

    def __init__(self, console: Console, label: str, total: int, done: int = 0) -> None:
        self.console = console
        self._bar: Progress | None = None
        if console.is_terminal and not console.quiet:
            self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True)
            self._task = self._bar.add_task(label, total=total, completed=done)

    def __enter__(self) -> StepProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, line: str | None = None) -> None:
        if line is not None:
            self.console.print(line, markup=False)
        if self._bar is not None:
            self._bar.advance(self._task)


@contextmanager
def stage(console: Console, what: str) -> Iterator[None]:
    """``what...`` before a slow stage and how long it took after it (rank 0)."""
    console.print(f"{what}...", markup=False)
    begin = time.perf_counter()
    yield
    console.print(f"{what}: {time.perf_counter() - begin:.1f} s", markup=False)
