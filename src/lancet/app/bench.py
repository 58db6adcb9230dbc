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
from lancet.runtime.inductor_options import inductor_options
from lancet.moe.priority_positions import priority_positions_from_environment
from lancet.runtime.hardware_queues import hardware_queues
from lancet.runtime.inline_collectives import inline_from_environment
from lancet.app.gc_policy import ScheduledCollection
from lancet.app.report import header_line
from lancet.measure.report import speedup, within_noise  # noqa: F401 (re-exported for the table)

PLAN_VARIANTS = ("lancet-dw", "lancet-part", "lancet")
EAGER_VARIANTS = ("eager", "eager-compiled")
"""``eager``: the step function op by op; ``eager-compiled``: ``torch.compile`` of it with default options."""
BASE_VARIANTS = (*EAGER_VARIANTS, "captured")
TUTEL_PREFIX = "tutel-d"
"""``tutel-dN``: only each MoE layer's all-to-alls and experts pipelined, N parts (N=1: captured)."""
EXECUTOR_SEPARATOR = ":"
"""Captured variants may name their executor: ``captured:compiled``, ``tutel-d2:cudagraph``, ``lancet:interpret``."""
INLINE_SUFFIX = "+inline"
"""A captured variant ending in ``+inline`` runs each collective that nothing overlaps as a blocking call on the
compute stream (``captured:cudagraph+inline``, ``lancet+inline``; ``lancet.runtime.inline_collectives``), so one
bench measures a step with and without it side by side."""


def split_variant(name: str) -> tuple[str, str | None]:
    """(graph variant, executor or None) of a variant name (``+inline`` left out)."""
    base, separator, executor = name.removesuffix(INLINE_SUFFIX).partition(EXECUTOR_SEPARATOR)
    return base, (executor if separator else None)


def inlines_collectives(name: str) -> bool:
    """Whether variant ``name`` asks for its collectives on the compute stream (``+inline``)."""
    return name.endswith(INLINE_SUFFIX)


def _is_known_base(base: str) -> bool:
    if base in BASE_VARIANTS or base in PLAN_VARIANTS:
        return True
    parts = variant_parts(base)  # tutel-d1 is the captured step; a part-dN needs at least two parts
    return parts is not None and parts >= (1 if base.startswith(TUTEL_PREFIX) else 2)


def variant_parts(name: str) -> int | None:
    """How many parts a ``tutel-dN`` or ``part-dN`` variant splits the batch into (None for other variants)."""
    from lancet.app.variant_runners import PART_PREFIX

    base, _ = split_variant(name)
    for prefix in (TUTEL_PREFIX, PART_PREFIX):
        if base.startswith(prefix) and base[len(prefix):].isdigit():
            return int(base[len(prefix):])
    return None


def check_parts_divide_batch(variants: list[str], batch_size: int) -> None:
    """Refuse, before anything runs, variants whose part count does not divide the rank's batch."""
    bad = [v for v in variants if (parts := variant_parts(v)) is not None and batch_size % parts]
    if bad:
        raise ValueError(f"variant(s) {', '.join(bad)} split the batch into parts, but the rank's batch of "
                         f"{batch_size} samples does not divide into that many; choose N dividing {batch_size}")


def is_known_variant(name: str) -> bool:
    from lancet.runtime.executor import EXECUTORS

    base, executor = split_variant(name)
    if executor is not None and (executor not in EXECUTORS or base in EAGER_VARIANTS):
        return False
    if inlines_collectives(name) and base in EAGER_VARIANTS:
        return False
    return _is_known_base(base)


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
    executor: str | None = None
    """Executor of captured variants that name none (None: the fastest the graph and device allow)."""
    measured: str | None = None
    """Bench JSON of a real run of the emulated configuration, printed next to the emulated rows."""

    def validate(self) -> None:
        from lancet.runtime.executor import EXECUTORS, check_executor_device

        unknown = [v for v in self.variants if not is_known_variant(v)]
        if unknown:
            known = ", ".join((*BASE_VARIANTS, *PLAN_VARIANTS, "tutel-dN", "part-dN"))
            raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {known}, captured ones optionally "
                             f"with an executor ({', '.join(f'captured:{e}' for e in EXECUTORS)}) and {INLINE_SUFFIX}")
        if self.executor is not None and self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        for variant in self.variants:
            base, executor = split_variant(variant)
            if base not in EAGER_VARIANTS:
                check_executor_device(executor or self.executor, device_type)
        if not self.variants:
            raise ValueError("give at least one variant")
        repeated = sorted({v for v in self.variants if self.variants.count(v) > 1})
        if repeated:
            raise ValueError(f"variant(s) {', '.join(repeated)} given more than once; use --rounds to repeat")
        needing = [v for v in self.variants if split_variant(v)[0] in PLAN_VARIANTS]
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
    """The variant's own peak of allocated GPU memory (model, optimizer, step), whatever ran before it."""
    trace: dict = field(default_factory=dict)
    """Medians of the profiled steps (a2a, exposed communication, ...)."""
    round_ms: list[float] = field(default_factory=list)
    """Median step time of each round (the spread shows run-to-run noise)."""
    predicted: dict | None = None
    quartiles_ms: list[float] = field(default_factory=list)
    """First and third quartile of the timed steps: the spread beside the median."""
    executor: str | None = None
    """What ran the step: interpret, compiled, cudagraph, torch.compile (eager-compiled); None for eager."""
    host_issue_ms: float | None = None
    """Median host time to issue a step (the step function's call, less time blocked waiting for split sizes)."""
    compile: dict | None = None
    """What compiling the step's regions cost (``lancet.runtime.compile.CompileReport``)."""
    emulated: str | None = None
    """``W:REGIME`` when the row was measured on an emulated rank (``--emulate``)."""
    replay_ms: dict[str, float] | None = None
    """CUDA-graph variants: phase -> median device ms of its replays over the timed steps, by CUDA events
    (no profiler running): the phase's window to set beside the profiled one (``trace``)."""
    held_forward_ms: float | None = None
    """CUDA-graph variants: median device ms of the forward's graph replayed alone with the host ahead of the
    GPU (``GraphedPhase.held_replay_ms``): the timed replay less the host's launch latency at the step's start."""

    def to_json(self) -> dict:
        return asdict(self)


def _runner(variant: str, session, plan, opts: BenchOptions, functions: dict):
    """The runner of ``variant`` (``lancet.app.variant_runners``); captured ones default to ``opts.executor``.

    ``functions``: the compiled regions of this bench, shared between its variants.
    """
    from lancet.app.variant_runners import build_runner

    base, executor = split_variant(variant)
    if base not in EAGER_VARIANTS and executor is None:
        executor = opts.executor
    runner = build_runner(base, executor, session, plan, parts_prefix=TUTEL_PREFIX, plan_variants=PLAN_VARIANTS,
                          functions=functions, inline_collectives=inlines_collectives(variant))
    if runner.note and session.runtime.is_main:
        print(f"{variant}: {runner.note}", flush=True)
    return runner


def _slowest_rank(values: list[float], group: dist.ProcessGroup) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.cpu().tolist()


def _timed_steps(one_step, opts: BenchOptions, runtime, collection: ScheduledCollection,
                 issue_ms: list[float], replays=None, replay_ms: dict[str, list[float]] | None = None) -> list[float]:
    """Warm-up, then wall-clock ms of each timed step on this rank (collection between steps, untimed);
    ``one_step`` returns its host issue ms, which are appended to ``issue_ms``. ``replays``: an executor
    whose graph replays are timed by events during the timed steps, appended per phase to ``replay_ms``."""
    for step in range(opts.warmup):
        one_step(step)
        collection.after_step(step)
    if replays is not None:
        replays.time_replays(True)
    times = []
    for step in range(opts.warmup, opts.warmup + opts.steps):
        runtime.synchronize()
        start = time.perf_counter()
        issue_ms.append(one_step(step))
        runtime.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        collection.after_step(step)
    if replays is not None:
        for phase, ms in replays.replay_ms().items():
            replay_ms.setdefault(phase, []).extend(ms)
        replays.time_replays(False)
    return times


def _profiled_steps(one_step, variant: str, forward_a2a: int, opts: BenchOptions, runtime) -> dict:
    """Trace ``opts.profile_steps`` more steps with torch.profiler; the summary of the trace ({} for none)."""
    from lancet.measure.phases import phase_gaps, phase_metrics
    from lancet.measure.trace_metrics import profile_steps, summarize

    if opts.profile_steps <= 0:
        return {}
    trace_dir = Path(opts.trace_dir or "lancet_traces") / variant.replace(EXECUTOR_SEPARATOR, "_")
    trace_dir.mkdir(parents=True, exist_ok=True)
    first = opts.warmup + opts.steps
    trace = profile_steps(
        lambda i: one_step(first + i),
        steps=opts.profile_steps,
        warmup=0,
        device=runtime.device,
        trace_path=trace_dir / f"rank{runtime.rank}.json",
    )
    gaps = phase_gaps(trace, "forward")
    return {**summarize(trace, forward_a2a), **phase_metrics(trace), **({"forward_gaps": gaps} if gaps else {})}


@dataclass(slots=True)
class _VariantState:
    """A variant's step function and what its rounds measured so far."""

    runner: Callable
    forward_a2a: int
    executor: str | None = None
    compile_report: Callable[[], dict | None] = lambda: None
    issue_ms: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    trace: dict = field(default_factory=dict)
    peak_gib: float | None = None
    replay_ms: dict[str, list[float]] = field(default_factory=dict)
    held_forward_ms: list[float] = field(default_factory=list)


HELD_REPLAYS = 5
"""Replays of the forward's graph alone with the host ahead, per round, after the timed steps."""


def _measure_round(state: _VariantState, variant: str, run: RunConfig, session, opts: BenchOptions,
                   initial: list[torch.Tensor], profile: bool, resident: int) -> None:
    """One round of ``variant``: fresh parameters and optimizer, warm-up, timed steps (and the profiled ones).

    Peak memory is the variant's own: the most allocated during the round, less what was allocated at its
    start beyond ``resident`` bytes (the session's model), i.e. less the bench's copy of the initial
    parameters and what other variants keep (their compiled state, graph outputs). The order of the
    variants does not change it.
    """
    from lancet.app.train import make_optimizer
    from lancet.moe.host_copy import blocked_seconds

    runtime = session.runtime
    with torch.no_grad():
        for p, v in zip(session.params, initial):
            p.copy_(v)
    session.optimizer = make_optimizer(run.optimizer, session.params, run.learning_rate)

    def one_step(step: int) -> float:
        tokens, targets = session.batch(step)
        blocked, begin = blocked_seconds(), time.perf_counter()
        result = state.runner(session.params, tokens, targets)
        issue_ms = (time.perf_counter() - begin - (blocked_seconds() - blocked)) * 1e3
        session.apply(result)
        return issue_ms

    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # every round starts from the same allocator state
        torch.cuda.reset_peak_memory_stats(runtime.device)
        held_elsewhere = torch.cuda.memory_allocated(runtime.device) - resident
    with ScheduledCollection(run.gc_every) as collection:
        replays = state.runner if hasattr(state.runner, "time_replays") and runtime.device.type == "cuda" else None
        times = _slowest_rank(_timed_steps(one_step, opts, runtime, collection, state.issue_ms, replays,
                                           state.replay_ms), runtime.group)
        if replays is not None and runtime.world_size == 1:  # one rank: a lone replay's collectives wait for no one
            state.held_forward_ms.extend(replays.held_replay_ms("forward", HELD_REPLAYS))
        if profile:
            state.trace = _profiled_steps(one_step, variant, state.forward_a2a, opts, runtime)
    state.times.extend(times)
    state.round_ms.append(statistics.median(times))
    if runtime.device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(runtime.device) - held_elsewhere) / 2**30
        state.peak_gib = max(peak, state.peak_gib or 0.0)


def _result(variant: str, state: _VariantState, session, plan, run: RunConfig) -> VariantResult:
    step_ms = statistics.median(state.times)
    tokens = session.model_cfg.tokens_per_rank * session.runtime.world_size
    result = VariantResult(variant, step_ms, tokens / (step_ms / 1e3), state.peak_gib, state.trace, list(state.round_ms),
                           emulated=run.emulate)
    result.quartiles_ms = quartiles(state.times)
    result.executor = state.executor
    result.host_issue_ms = statistics.median(state.issue_ms) if state.issue_ms else None
    result.compile = state.compile_report()
    result.replay_ms = {phase: statistics.median(ms) for phase, ms in state.replay_ms.items() if ms} or None
    result.held_forward_ms = statistics.median(state.held_forward_ms) if state.held_forward_ms else None
    base = split_variant(variant)[0]
    if plan is not None and base in PLAN_VARIANTS:
        result.predicted = plan.variant(base).predicted
    elif plan is not None and base in BASE_VARIANTS:
        result.predicted = plan.predicted
    return result


def bench_worker(run: RunConfig, opts: BenchOptions) -> list[dict]:
    from lancet.plan.plan import load_plan
    from lancet.app.train import build_session

    with rank_runtime(run.network, run.collective_timeout, run.emulation()) as runtime:
        session = build_session(run, runtime)
        check_parts_divide_batch(opts.variants, session.batch(0)[0].shape[0])
        plan = load_plan(opts.plan, session.identity) if opts.plan else None
        resident = torch.cuda.memory_allocated(runtime.device) if runtime.device.type == "cuda" else 0
        initial = [p.detach().clone() for p in session.params]
        console = Console(width=220)
        if runtime.is_main:
            console.print(header_line(run, session, step=f"variants {', '.join(opts.variants)}"), markup=False)
        states: dict[str, _VariantState] = {}
        functions: dict = {}
        for round_index in range(opts.rounds):
            last = round_index == opts.rounds - 1
            for i, variant in enumerate(opts.variants, 1):
                begin = time.perf_counter()
                if variant not in states:
                    runner = _runner(variant, session, plan, opts, functions)
                    states[variant] = _VariantState(runner.step, runner.forward_a2a, runner.executor,
                                                    runner.compile_report)
                _measure_round(states[variant], variant, run, session, opts, initial, profile=last, resident=resident)
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
        json.dump({"run": run.to_dict(), "world_size": world_size, "emulated": emulated,
                   "inductor_options": inductor_options(), "inline_collectives": inline_from_environment(),
                   "cuda_device_max_connections": hardware_queues(),
                   "priority_positions": priority_positions_from_environment(), "results": rows}, f, indent=1)
    partial.replace(path)


def quartiles(times: list[float]) -> list[float]:
    """[first, third] quartile of step times (both the one time when there is one)."""
    if len(times) < 2:
        return [times[0], times[0]] if times else []
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return [q1, q3]


def _spread(round_ms: list[float]) -> str:
    if len(round_ms) < 2:
        return ""
    return f"{(max(round_ms) - min(round_ms)) / statistics.median(round_ms):.1%}"


def print_table(rows: list[dict], run: RunConfig, console: Console) -> None:
    title = f"{run.spec.describe()} dtype={run.dtype} {run.network_label}"
    table = Table(title=title)
    rounds = max(len(r.get("round_ms") or ()) for r in rows)
    columns = ("variant", "executor", "step ms", "q1-q3 ms", "x eager", "tokens/s", "a2a ms", "exposed a2a",
               "exposed bwd a2a", "exposed comm", "two-lane bound", "predicted ms", "host issue ms", "fwd idle",
               "bwd idle", "peak GiB") + (("round spread",) if rounds > 1 else ())
    for column in columns:
        table.add_column(column, justify="right")
    eager = next((r for r in rows if r["variant"] == "eager"), None)
    for r in rows:
        t = r["trace"]
        q = r.get("quartiles_ms") or []
        table.add_row(
            r["variant"],
            r.get("executor") or "",
            f"{r['step_ms']:.2f}",
            f"{q[0]:.2f}-{q[1]:.2f}" if q else "",
            speedup(r, eager),
            f"{r['tokens_per_s']:,.0f}",
            f"{t['a2a_ms']:.2f}" if t else "",
            f"{t['exposed_a2a_ms']:.2f}" if t else "",
            f"{t['exposed_backward_a2a_ms']:.2f}" if t else "",
            f"{t['exposed_comm_ms']:.2f}" if t else "",
            f"{max(t['compute_ms'], t['comm_ms']):.2f}" if t else "",
            f"{r['predicted']['makespan_ms']:.2f}" if r.get("predicted") else "",
            _ms(r.get("host_issue_ms")),
            _ms(t.get("forward_idle_ms")),
            _ms(t.get("backward_idle_ms")),
            f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "",
            *((_spread(r["round_ms"]),) if rounds > 1 else ()),
        )
    console.print(table)
    if rounds > 1:
        console.print(f"step ms: median of all timed steps of {rounds} rounds; round spread: (slowest - fastest round "
                      "median) / step ms")
    console.print("step ms: median; q1-q3: first to third quartile of the timed steps; x eager: eager median / "
                  "variant median, '~' where the quartile ranges overlap: that difference is within noise")
    console.print("times in ms; exposed = not covered by compute kernels; two-lane bound = max(compute kernel time, "
                  "communication kernel time) (profiled steps, rank 0); host issue = host time to issue a step; "
                  "fwd/bwd idle = GPU time with no kernel running inside the phase")
    if run.emulate is not None:
        console.print(f"every row emulated ({run.emulate}): rank 0 of the job run alone, its collectives stand-ins that "
                      "hold the communication stream for the regime's time; tokens/s counts every rank of the job")
    for r in rows:
        gaps = (r.get("trace") or {}).get("forward_gaps")
        if gaps:
            longest = ", ".join(f"{ms:.3f} ms before {after[:40]}" for ms, _, after in gaps["longest"])
            waited = ", ".join(f"{ms:.2f} ms in {n:.0f} before {name[:40]}" for ms, n, name in gaps.get("small_by_next", []))
            waited = f"; short gaps by the kernel after them: {waited}" if waited else ""
            unprofiled = _unprofiled_forward(r)
            console.print(f"forward idle of {r['variant']}: {gaps['gaps']:.0f} gaps, {gaps['small_gaps_ms']:.2f} ms in "
                          f"gaps under 10 us, {gaps['long_gaps_ms']:.2f} ms in longer ones; longest: {longest}"
                          f"{waited}{unprofiled}", markup=False)
    for r in rows:
        if r.get("compile") and r["compile"]["compiled_regions"]:
            report = r["compile"]
            console.print(f"compile {r['variant']}: {report['compiled_regions']} of {report['regions']} regions "
                          f"({report['compiles']} distinct) in {report['seconds']:.1f} s, Inductor cache "
                          f"{report['cache'].get('fxgraph_cache_hit', 0)} hit(s) / "
                          f"{report['cache'].get('fxgraph_cache_miss', 0)} miss(es)", markup=False)


def _forward_idle_ms(row: dict, replayed: float | None) -> tuple[float, float, float] | None:
    """(``replayed``, the profiled forward kernels' busy ms, their difference); None without either."""
    trace = row.get("trace") or {}
    if replayed is None or "forward_gpu_ms" not in trace:
        return None
    busy = trace["forward_gpu_ms"] - trace.get("forward_idle_ms", 0.0)
    return replayed, busy, replayed - busy


def unprofiled_forward_idle_ms(row: dict) -> tuple[float, float, float] | None:
    """(forward replay ms by events, profiled kernels' busy ms, their difference) of a bench row: the forward's
    idle without a profiler; None when the row has no timed replay or no profiled forward."""
    return _forward_idle_ms(row, (row.get("replay_ms") or {}).get("forward"))


def held_forward_idle_ms(row: dict) -> tuple[float, float, float] | None:
    """As ``unprofiled_forward_idle_ms``, from the forward's graph replayed with the host ahead
    (``held_forward_ms``): the GPU's waits inside the graph, without the launch latency at the step's start."""
    return _forward_idle_ms(row, row.get("held_forward_ms"))


def _unprofiled_forward(row: dict) -> str:
    """The forward's replay timed without a profiler beside its profiled window ("" when either is missing)."""
    idle = unprofiled_forward_idle_ms(row)
    if idle is None:
        return ""
    return (f"; forward replay by events, no profiler: {idle[0]:.2f} ms against the profiled window's "
            f"{row['trace']['forward_gpu_ms']:.2f}, so about {max(0.0, idle[2]):.2f} ms idle without a profiler "
            f"(the replay less the profiled kernels' busy time)" + _held_forward(row))


def _held_forward(row: dict) -> str:
    idle = held_forward_idle_ms(row)
    if idle is None:
        return ""
    return (f"; with the host ahead of the GPU: {idle[0]:.2f} ms, about {max(0.0, idle[2]):.2f} ms idle "
            f"({100 * max(0.0, idle[2]) / idle[0]:.1f}% of it)")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"
