"""The training loop run on every rank: build, agree, resume, step, check, apply, checkpoint, report.

Before the first step every rank checks that its run settings, plan and step
graph equal rank 0's (``lancet.app.agreement``). After every step one small
all-reduce gives the mean loss and the ranks' agreement on non-finite values
and stop requests (``lancet.app.guard``); the update is applied only then.
Checkpoints (``lancet.app.checkpoint``) are written every ``checkpoint_every``
steps, after the last step and when a stop was requested (Ctrl-C). Rank 0
prints a header, per-step loss and tokens/s, and a summary and, when asked,
writes one JSON object per step to a metrics file (appended to on resume).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from lancet.plan.artifact import RunIdentity
from lancet.app.agreement import RankFacts, check_agreement, digest
from lancet.app.checkpoint import Checkpointer, latest_checkpoint
from lancet.app.config import RunConfig, build_run_model, checkpoint_identity
from lancet.app.data import make_batch_source
from lancet.app.faults import maybe_inject_fault, maybe_poison_gradients
from lancet.app.gc_policy import ScheduledCollection
from lancet.app.guard import StepGuard
from lancet.app.report import StepProgress, console_for, header_line, stage, step_line, summary_line
from lancet.app.stop import StopRequest, StoppedOnRequest
from lancet.runtime.dist import Runtime, rank_runtime
from lancet.models import GPT2MoEConfig
from lancet.step.train_step import StepResult, TrainStep, apply_gradients

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
        apply_gradients(self.optimizer, self.params, result.grads)


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.01)
    return torch.optim.AdamW(params, lr=lr)


@dataclass(frozen=True, slots=True)
class FactoryModel:
    """What the loop and the reports read of a model made by a ``--model`` factory."""

    name: str
    batch_size: int
    seq_len: int
    experts: int
    """Expert-local parameters on this rank."""

    @property
    def tokens_per_rank(self) -> int:
        return self.batch_size * self.seq_len


def build_session(run: RunConfig, runtime: Runtime) -> Session:
    model_cfg = run.validate(runtime.world_size)
    if model_cfg is None:
        return _factory_session(run, runtime)
    model = build_run_model(model_cfg, runtime.group, device=runtime.device, seed=run.seed)
    train_step = TrainStep(model, runtime.group, autocast_dtype=AUTOCAST[run.dtype])
    params = train_step.parameters()
    batches = make_batch_source(run.data, model_cfg.batch_size, model_cfg.seq_len, model_cfg.vocab_size, run.seed)
    optimizer = make_optimizer(run.optimizer, params, run.learning_rate)
    identity = run.identity(runtime.world_size, runtime.device)
    return Session(runtime, model_cfg, train_step, params, optimizer, batches, identity)


def factory_step(reference: str, group, device: torch.device, rank: int, autocast_dtype, make_optimizer_for):
    """A ``--model package.module:factory`` model as a step: ``(bundle, optimizer, train_step, inputs, targets)``.

    The TrainStep's expert parameters are checked on the graph of this rank's first batch (on ``device``);
    ``make_optimizer_for(params)`` builds the optimizer.
    """
    from lancet.api import Step
    from lancet.models.factory import build_bundle

    bundle = build_bundle(reference, group, device)
    optimizer = make_optimizer_for(list(bundle.model.parameters()))
    step = Step(bundle.model, bundle.loss_fn, optimizer, group=group, expert_params=bundle.expert_params,
                autocast_dtype=autocast_dtype, name=bundle.name)
    inputs, targets = (t.to(device) for t in bundle.batch(0, rank))
    return bundle, optimizer, step.train_step((inputs, targets)), inputs, targets


def _factory_session(run: RunConfig, runtime: Runtime) -> Session:
    """The session of a ``--model package.module:factory`` model (the bundle makes the batches)."""
    torch.manual_seed(run.seed)
    bundle, optimizer, train_step, inputs, _ = factory_step(
        run.spec.model, runtime.group, runtime.device, runtime.rank, AUTOCAST[run.dtype],
        lambda params: make_optimizer(run.optimizer, params, run.learning_rate),
    )
    shape = tuple(inputs.shape) + (1,)
    info = FactoryModel(bundle.name, shape[0], shape[1], len(train_step.expert_names))
    return Session(runtime, info, train_step, train_step.parameters(), optimizer, bundle,
                   run.identity(runtime.world_size, runtime.device))


def make_runner(run: RunConfig, session: Session):
    """The step function for ``run.mode``: the eager TrainStep or the captured graph under ``run.executor``."""
    if run.mode == "eager":
        return session.train_step
    from lancet.app.compile_progress import compile_progress
    from lancet.runtime.captured import captured_runner

    runner = captured_runner(session, plan_path=run.plan, variant=run.plan_variant, executor=run.executor,
                             progress=compile_progress(session.runtime.is_main))
    if session.runtime.is_main:
        print(f"executor: {runner.kind}" + (f" ({runner.note})" if runner.note else ""), flush=True)
    return runner


def train_worker(run: RunConfig) -> list[dict]:
    """Entry point of one rank; returns the per-step records (on every rank)."""
    with rank_runtime(run.network, run.collective_timeout, run.emulation()) as runtime:
        return _train(run, runtime)


def _train(run: RunConfig, runtime: Runtime) -> list[dict]:
    console = console_for(runtime.is_main)
    begin = time.perf_counter()
    with stage(console, "building the model and reading the data"):
        session = build_session(run, runtime)
    console.print(header_line(run, session), markup=False)
    if run.mode == "eager":
        runner = make_runner(run, session)
    else:
        with stage(console, "capturing the step graph"):
            runner = make_runner(run, session)
    check_agreement(rank_facts(run, runner), runtime.group, runtime.device)
    checkpointer = make_checkpointer(run, session)
    first = resume(run, checkpointer, console)
    records, stopped = _loop(run, session, runner, checkpointer, first, console)
    console.print(summary_line(records, time.perf_counter() - begin, first), markup=False)
    if stopped is not None:
        raise StoppedOnRequest(stopped)
    return records


def _loop(run: RunConfig, session: Session, runner, checkpointer, first: int, console) -> tuple[list[dict], str | None]:
    """Steps ``first`` .. ``run.steps - 1``; checkpoints every ``run.checkpoint_every`` steps, at the end and on stop.

    Returns the records and, when the ranks stopped on request, what to tell the user.
    """
    runtime = session.runtime
    guard = StepGuard(session.train_step.param_names, run.nonfinite, runtime.group, runtime.device)
    records: list[dict] = []
    stopped = None
    with ExitStack() as stack:
        metrics = _open_metrics(run, runtime, append=first > 0)
        if metrics is not None:
            stack.enter_context(metrics)
        collection = stack.enter_context(ScheduledCollection(run.gc_every))
        stop = stack.enter_context(StopRequest())
        progress = stack.enter_context(StepProgress(console, "train", run.steps, first))
        for step in range(first, run.steps):
            record, verdict = _one_step(run, session, runner, guard, step, stop)
            records.append(record)
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            progress.advance(step_line(record))
            done = step + 1
            path = None
            if checkpointer is not None and (verdict.stop or done % run.checkpoint_every == 0 or done == run.steps):
                path = checkpointer.save(done)
                console.print(f"checkpoint -> {path}", markup=False)
            if verdict.stop:
                saved = f"checkpoint {path}" if path else "nothing saved (no --checkpoint-dir)"
                stopped = f"stopped on request after step {step} on every rank; {saved}"
                break
            collection.after_step(step)
    return records, stopped


def _one_step(run: RunConfig, session: Session, runner, guard: StepGuard, step: int, stop: StopRequest):
    """Run the step, agree with the other ranks on its outcome, apply (or skip) the update."""
    runtime = session.runtime
    maybe_inject_fault(runtime.rank, step)
    tokens, targets = session.batch(step)
    runtime.synchronize()
    start = time.perf_counter()
    result = runner(session.params, tokens, targets)
    maybe_poison_gradients(runtime.rank, step, result.grads, session.train_step.param_names)
    verdict = guard.check(step, result.loss, result.grads, stop.requested)  # a Ctrl-C during the step counts
    if not verdict.skip:
        session.apply(result)
    runtime.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_step = session.model_cfg.tokens_per_rank * runtime.world_size
    record = {
        "step": step,
        "loss": verdict.loss,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens_per_step / seconds,
        "dropped_fraction": _dropped_fraction(result),
    }
    if verdict.skip:
        record["skipped"] = verdict.nonfinite
    if runtime.device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
    return record, verdict


def _open_metrics(run: RunConfig, runtime: Runtime, append: bool):
    """Rank 0's metrics file (appended to when resuming), or None."""
    if not (run.metrics_jsonl and runtime.is_main):
        return None
    return open(run.metrics_jsonl, "a" if append else "w")


def rank_facts(run: RunConfig, runner) -> RankFacts:
    """This rank's run settings, plan bytes and step graph, as digests (see ``lancet.app.agreement``)."""
    from lancet.cost.profile import graph_fingerprint

    plan = digest(Path(run.plan).read_bytes() + run.plan_variant.encode()) if run.plan else digest(None)
    train_graph = getattr(runner, "train_graph", None)
    graph = digest(graph_fingerprint(train_graph.graph) if train_graph is not None else run.mode)
    return RankFacts(settings=digest(run.settings()), plan=plan, graph=graph)


def make_checkpointer(run: RunConfig, session: Session) -> Checkpointer | None:
    if run.checkpoint_dir is None:
        return None
    return Checkpointer(Path(run.checkpoint_dir), session.train_step.model, session.optimizer, session.runtime.group,
                        session.runtime.device, checkpoint_identity(run, session.runtime.world_size))


def resume(run: RunConfig, checkpointer: Checkpointer | None, console) -> int:
    """The first step to run: 0, or the step of the latest complete checkpoint when resuming."""
    if not run.resume:
        return 0
    latest = latest_checkpoint(run.checkpoint_dir)
    if latest is None:
        console.print(f"no complete checkpoint in {run.checkpoint_dir}: starting at step 0", markup=False)
        return 0
    step = checkpointer.load(latest[1])
    console.print(f"resumed from {latest[1]} (step {step})", markup=False)
    return step


def _dropped_fraction(result: StepResult) -> float:
    if not result.keep:
        return 0.0
    kept = torch.stack([k.sum() for k in result.keep]).sum().item()  # one host read per step
    total = sum(k.numel() for k in result.keep)
    return 1.0 - kept / total
