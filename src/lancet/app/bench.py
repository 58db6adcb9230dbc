"""``lancet bench``: run step variants side by side in one launch and compare them.

Every variant starts from the same parameters and sees the same batches. Per
variant: warm-up steps, timed steps (wall clock around step + optimizer, the
slowest rank counts, median reported), then a few profiled steps whose
torch.profiler trace gives all-to-all time and exposed (non-overlapped)
communication. With ``rounds`` > 1 the variant list is run that many times in
turn (A B C A B C), each round from the initial parameters, so slow drift of the
machine falls on every variant alike; traces come from the last round.
Python garbage collection runs only between steps. Rank 0 prints the table and
writes JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from lancet.app.config import RunConfig
from lancet.runtime.dist import rank_runtime
from lancet.app.gc_policy import ScheduledCollection
from lancet.step.train_step import StepResult

PLAN_VARIANTS = ("lancet-dw", "lancet-part", "lancet")
BASE_VARIANTS = ("eager", "captured")
TUTEL_PREFIX = "tutel-d"
"""``tutel-dN``: only each MoE layer's all-to-alls and experts pipelined, N parts (N=1: captured)."""


def is_known_variant(name: str) -> bool:
    if name in BASE_VARIANTS or name in PLAN_VARIANTS:
        return True
    return name.startswith(TUTEL_PREFIX) and name[len(TUTEL_PREFIX):].isdigit() and int(name[len(TUTEL_PREFIX):]) >= 1


@dataclass(kw_only=True, slots=True)
class BenchOptions:
    variants: list[str]
    steps: int = 20
    warmup: int = 5
    profile_steps: int = 3
    plan: str | None = None
    json_path: str | None = None
    trace_dir: str | None = None
    rounds: int = 1
    """Rounds over the variant list (A B C A B C ...): drift in the machine falls on every variant alike."""
    measured: str | None = None
    """Bench JSON of a real run of the emulated configuration, printed next to the emulated rows."""

    def validate(self) -> None:
        unknown = [v for v in self.variants if not is_known_variant(v)]
        if unknown:
            known = ", ".join((*BASE_VARIANTS, *PLAN_VARIANTS, "tutel-dN"))
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {known}")
        if not self.variants:
            raise ValueError("give at least one variant")
        repeated = sorted({v for v in self.variants if self.variants.count(v) > 1})
        if repeated:
            raise ValueError(f"variant(s) {', '.join(repeated)} given more than once; use --rounds to repeat")
        needing = [v for v in self.variants if v in PLAN_VARIANTS]
        if needing and self.plan is None:
            raise ValueError(f"variant(s) {', '.join(needing)} need --plan (from `lancet optimize`)")
        if self.plan is not None and not Path(self.plan).exists():
            raise FileNotFoundError(f"plan file {self.plan!r} does not exist")
        if self.measured is not None and not Path(self.measured).exists():
            raise FileNotFoundError(f"measured bench file {self.measured!r} does not exist")
        if self.steps < 1 or self.warmup < 0 or self.profile_steps < 0 or self.rounds < 1:
            raise ValueError("--steps and --rounds must be >= 1, --warmup and --profile-steps >= 0")


@dataclass(slots=True)
class VariantResult:
    variant: str
    step_ms: float
    tokens_per_s: float
    peak_mem_gib: float | None
    trace: dict = field(default_factory=dict)
    """Medians of the profiled steps (a2a, exposed communication, ...)."""
    round_ms: list[float] = field(default_factory=list)
    """Median step time of each round (the spread shows run-to-run noise)."""
    predicted: dict | None = None
    emulated: str | None = None
    """``W:REGIME`` when the row was measured on an emulated rank (``--emulate``)."""

    def to_json(self) -> dict:
        return asdict(self)


def _runner(variant: str, session, plan) -> tuple[Callable[[list, torch.Tensor, torch.Tensor], StepResult], int]:
    """The step function of ``variant`` and the number of all-to-alls its forward issues."""
    moe_layers = sum(1 for i in range(session.model_cfg.num_layers) if session.model_cfg.is_moe_block(i))
    if variant == "eager":
        return session.train_step, 3 * moe_layers  # counts exchange, dispatch, combine per layer
    from lancet.graph.analysis import analyze
    from lancet.runtime.captured import CapturedStep

    batch = session.batch(0)
    if variant in PLAN_VARIANTS:
        from lancet.plan.plan import build_step_graph

        train_graph = build_step_graph(session.train_step, *batch, plan, variant)
    elif variant.startswith(TUTEL_PREFIX):
        from lancet.plan.plan import tutel_graph

        train_graph = tutel_graph(session.train_step, *batch, int(variant[len(TUTEL_PREFIX):]))
    else:
        from lancet.capture.trace import capture_step

        train_graph = capture_step(session.train_step, *batch)
    forward_a2a = len(analyze(train_graph).collectives_of("all_to_all", "forward"))
    return CapturedStep(train_graph), forward_a2a


def _slowest_rank(values: list[float], group: dist.ProcessGroup) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.cpu().tolist()


def _timed_steps(one_step, opts: BenchOptions, runtime, collection: ScheduledCollection) -> list[float]:
    """Warm-up, then wall-clock ms of each timed step on this rank (collection between steps, untimed)."""
    for step in range(opts.warmup):
        one_step(step)
        collection.after_step(step)
    times = []
    for step in range(opts.warmup, opts.warmup + opts.steps):
        runtime.synchronize()
        start = time.perf_counter()
        one_step(step)
        runtime.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        collection.after_step(step)
    return times


def _profiled_steps(one_step, variant: str, forward_a2a: int, opts: BenchOptions, runtime) -> dict:
    """Trace ``opts.profile_steps`` more steps with torch.profiler; the summary of the trace ({} for none)."""
    from lancet.measure.trace_metrics import profile_steps, summarize

    if opts.profile_steps <= 0:
        return {}
    trace_dir = Path(opts.trace_dir or "lancet_traces") / variant
    trace_dir.mkdir(parents=True, exist_ok=True)
    first = opts.warmup + opts.steps
    trace = profile_steps(
        lambda i: one_step(first + i),
        steps=opts.profile_steps,
        warmup=0,
        device=runtime.device,
        trace_path=trace_dir / f"rank{runtime.rank}.json",
    )
    return summarize(trace, forward_a2a)


@dataclass(slots=True)
class _VariantState:
    """A variant's step function and what its rounds measured so far."""

    runner: Callable
    forward_a2a: int
    times: list[float] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    trace: dict = field(default_factory=dict)
    peak_gib: float | None = None


def _measure_round(state: _VariantState, variant: str, run: RunConfig, session, opts: BenchOptions,
                   initial: list[torch.Tensor], profile: bool) -> None:
    """One round of ``variant``: fresh parameters and optimizer, warm-up, timed steps (and the profiled ones)."""
    from lancet.app.train import make_optimizer

    runtime = session.runtime
    with torch.no_grad():
        for p, v in zip(session.params, initial):
            p.copy_(v)
    session.optimizer = make_optimizer(run.optimizer, session.params, run.learning_rate)

    def one_step(step: int) -> None:
        session.apply(state.runner(session.params, *session.batch(step)))

    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # every round starts from the same allocator state
        torch.cuda.reset_peak_memory_stats(runtime.device)
    with ScheduledCollection(run.gc_every) as collection:
        times = _slowest_rank(_timed_steps(one_step, opts, runtime, collection), runtime.group)
        if profile:
            state.trace = _profiled_steps(one_step, variant, state.forward_a2a, opts, runtime)
    state.times.extend(times)
    state.round_ms.append(statistics.median(times))
    if runtime.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(runtime.device) / 2**30
        state.peak_gib = max(peak, state.peak_gib or 0.0)


def _result(variant: str, state: _VariantState, session, plan, run: RunConfig) -> VariantResult:
    step_ms = statistics.median(state.times)
    tokens = session.model_cfg.tokens_per_rank * session.runtime.world_size
    result = VariantResult(variant, step_ms, tokens / (step_ms / 1e3), state.peak_gib, state.trace, list(state.round_ms),
                           emulated=run.emulate)
    if plan is not None and variant in PLAN_VARIANTS:
        result.predicted = plan.variant(variant).predicted
    elif plan is not None and variant in BASE_VARIANTS:
        result.predicted = plan.predicted
    return result


def bench_worker(run: RunConfig, opts: BenchOptions) -> list[dict]:
    from lancet.plan.plan import load_plan
    from lancet.app.train import build_session

    with rank_runtime(run.network, run.emulation()) as runtime:
        session = build_session(run, runtime)
        plan = load_plan(opts.plan, session.identity) if opts.plan else None
        initial = [p.detach().clone() for p in session.params]
        console = Console(width=160)
        states: dict[str, _VariantState] = {}
        for round_index in range(opts.rounds):
            last = round_index == opts.rounds - 1
            for i, variant in enumerate(opts.variants, 1):
                begin = time.perf_counter()
                if variant not in states:
                    states[variant] = _VariantState(*_runner(variant, session, plan))
                _measure_round(states[variant], variant, run, session, opts, initial, profile=last)
                if runtime.is_main:
                    console.print(f"[round {round_index + 1}/{opts.rounds}, {i}/{len(opts.variants)}] {variant}: "
                                  f"{states[variant].round_ms[-1]:.2f} ms per step "
                                  f"({time.perf_counter() - begin:.0f} s with capture, warm-up and profiling)",
                                  markup=False)
                    if opts.json_path:  # after every variant, so a run cut short keeps what it measured
                        rows = [_result(v, st, session, plan, run).to_json() for v, st in states.items()]
                        _write_json(opts.json_path, run, runtime.world_size, rows)
        rows = [_result(v, states[v], session, plan, run).to_json() for v in opts.variants]
        if runtime.is_main:
            print_table(rows, run, console)
            if opts.measured:
                from lancet.app.emulation_report import load_measured, print_comparison

                print_comparison(rows, load_measured(opts.measured, run), run, console)
        return rows


def _write_json(path: str, run: RunConfig, world_size: int, rows: list[dict]) -> None:
    partial = Path(path).with_name(Path(path).name + ".part")
    with open(partial, "w") as f:
        emulation = run.emulation()
        emulated = emulation.record() if emulation is not None else None
        json.dump({"run": run.to_dict(), "world_size": world_size, "emulated": emulated, "results": rows}, f, indent=1)
    partial.replace(path)


def _spread(round_ms: list[float]) -> str:
    if len(round_ms) < 2:
        return ""
    return f"{(max(round_ms) - min(round_ms)) / statistics.median(round_ms):.1%}"


def print_table(rows: list[dict], run: RunConfig, console: Console) -> None:
    title = f"{run.spec.model} gate={run.spec.gate} dtype={run.dtype} {run.network_label}"
    table = Table(title=title)
    rounds = max(len(r.get("round_ms") or ()) for r in rows)
    columns = ("variant", "step ms", "x eager", "tokens/s", "a2a ms", "exposed a2a", "exposed bwd a2a",
               "exposed comm", "two-lane bound", "predicted ms", "peak GiB") + (("round spread",) if rounds > 1 else ())
    for column in columns:
        table.add_column(column, justify="right")
    eager = next((r["step_ms"] for r in rows if r["variant"] == "eager"), None)
    for r in rows:
        t = r["trace"]
        table.add_row(
            r["variant"],
            f"{r['step_ms']:.2f}",
            f"{eager / r['step_ms']:.3f}" if eager else "",
            f"{r['tokens_per_s']:,.0f}",
            f"{t['a2a_ms']:.2f}" if t else "",
            f"{t['exposed_a2a_ms']:.2f}" if t else "",
            f"{t['exposed_backward_a2a_ms']:.2f}" if t else "",
            f"{t['exposed_comm_ms']:.2f}" if t else "",
            f"{max(t['compute_ms'], t['comm_ms']):.2f}" if t else "",
            f"{r['predicted']['makespan_ms']:.2f}" if r.get("predicted") else "",
            f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "",
            *((_spread(r["round_ms"]),) if rounds > 1 else ()),
        )
    console.print(table)
    if rounds > 1:
        console.print(f"step ms: median of all timed steps of {rounds} rounds; round spread: (slowest - fastest round "
                      "median) / step ms")
    console.print("times in ms; exposed = not covered by compute kernels; two-lane bound = max(compute kernel time, "
                  "communication kernel time) (profiled steps, rank 0)")
    if run.emulate is not None:
        console.print(f"every row emulated ({run.emulate}): rank 0 of the job run alone, its collectives stand-ins that "
                      "hold the communication stream for the regime's time; tokens/s counts every rank of the job")
