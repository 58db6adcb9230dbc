"""Executors of a captured step graph: interpreted, compiled regions, or CUDA-graph replay.

- ``interpret``: the graph's generated Python code, op by op (one call per node);
- ``compiled``: every static compute region between communication points runs as
  one ``torch.compile`` function (Inductor); collectives, waits, host copies and
  waits, and regions with data-dependent sizes run as traced, where the plan put
  them (``lancet.runtime.program``);
- ``cudagraph``: the compiled step, collectives included, captured once per phase
  as CUDA graphs after warm-up steps on a side stream, then replayed
  (``lancet.runtime.cudagraph``).

The default is the fastest the graph and the device allow: ``cudagraph`` on a CUDA
device when nothing in the step waits for the host, else ``compiled``. Asking for
``cudagraph`` where the step needs the host runs it compiled and says which node
is to blame (``StepExecutor.note``); asking for it without a CUDA device is refused.

Every executor is a callable with the eager ``TrainStep`` signature and marks each
phase with a ``torch.profiler.record_function`` range (``lancet/forward``,
``lancet/backward``). With ``inline_collectives`` a collective that nothing overlaps
runs on the compute stream (``lancet.runtime.inline_collectives``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lancet.capture.trace import TrainGraph
from lancet.graph.regions import MIN_KERNELS
from lancet.runtime.compile import CompileEvent, CompileReport, RegionCompiler
from lancet.runtime.cudagraph import GraphedPhase, WarmPhase, warm_up_on_side_stream, why_not_graphed
from lancet.runtime.inline_collectives import inline_candidates, inline_collectives, inline_from_environment
from lancet.runtime.program import build_program, forward_outputs_kept
from lancet.step.train_step import StepResult

EXECUTORS = ("interpret", "compiled", "cudagraph")


class ExecutorError(ValueError):
    """An executor that cannot run here (e.g. ``cudagraph`` without a CUDA device)."""


@dataclass(kw_only=True, slots=True)
class ExecutorConfig:
    """How to run a captured step."""

    kind: str | None = None
    """One of ``EXECUTORS``; None: the fastest the graph and device allow (``default_executor``)."""
    backend: str = "inductor"
    """``torch.compile`` backend of the compiled regions."""
    min_kernels: int = MIN_KERNELS
    """Static regions with fewer nodes that launch work run as traced."""
    warmup: int = 2
    """``cudagraph``: steps run compiled on a side stream before the capture."""
    inline_collectives: bool = field(default_factory=inline_from_environment)
    """Run each all-to-all and all-reduce that nothing overlaps as a blocking call on the compute stream
    (default: ``LANCET_INLINE_COLLECTIVES=1``; ``lancet.runtime.inline_collectives``)."""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.warmup < 1:
            raise ValueError("cudagraph warm-up needs at least one step (NCCL and Inductor initialise in it)")


def check_executor_device(kind: str | None, device_type: str) -> None:
    """Refuse ``cudagraph`` on a machine without CUDA (before any rank starts)."""
    if kind == "cudagraph" and device_type != "cuda":
        raise ExecutorError(
            "the cudagraph executor replays CUDA graphs and needs a CUDA device; this run is on "
            f"{device_type} (use --executor compiled or interpret)"
        )


def default_executor(train_graph: TrainGraph, device: torch.device) -> str:
    """``cudagraph`` when the step can be graphed on ``device``, else ``compiled``."""
    return "cudagraph" if why_not_graphed(train_graph.graph, device) is None else "compiled"


def resolve_executor(requested: str | None, train_graph: TrainGraph, device: torch.device) -> tuple[str, str | None]:
    """The executor to run and a note saying why it differs from the one requested (None if it does not)."""
    check_executor_device(requested, device.type)
    if requested is None:
        return default_executor(train_graph, device), None
    if requested == "cudagraph":
        reason = why_not_graphed(train_graph.graph, device)
        if reason is not None:
            return "compiled", f"not captured as CUDA graphs: {reason}; running compiled without graphs"
    return requested, None


class StepExecutor:
    """Runs a TrainGraph every step with the chosen executor; the ``TrainStep`` call signature."""

    def __init__(self, train_graph: TrainGraph, config: ExecutorConfig | None = None,
                 progress: Callable[[CompileEvent], None] | None = None,
                 functions: dict[str, Callable] | None = None) -> None:
        config = config or ExecutorConfig()
        self.train_graph = train_graph
        self.config = config
        self.kind, self.note = resolve_executor(config.kind, train_graph, train_graph.device)
        self.program = build_program(train_graph, fuse=self.kind != "interpret", min_kernels=config.min_kernels)
        inlined = self._inline_collectives() if config.inline_collectives else 0
        self.compiler = RegionCompiler(config.backend, len(self.program.calls), progress, functions)
        for call in self.program.calls.values():
            self.compiler.attach(call)
        report = self.compiler.report
        report.regions = len(self.program.regions)
        report.inlined_collectives = inlined
        for region in self.program.regions:
            if region.index not in self.program.calls:
                report.interpreted_regions[region.kind] = report.interpreted_regions.get(region.kind, 0) + 1
        self.steps = 0
        self._params: list[torch.Tensor] | None = None
        self._side: torch.cuda.Stream | None = None
        self._timing = False

    def _inline_collectives(self) -> int:
        names = inline_candidates(self.train_graph.graph)
        inlined = 0
        for phase in self.program.phases:
            changed = inline_collectives(phase.module, names)
            if changed:
                phase.module.recompile()
                phase.impl = phase.module.forward
            inlined += changed
        return inlined

    @property
    def compile_report(self) -> CompileReport:
        return self.compiler.report

    def __call__(self, params: list[torch.Tensor], tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> StepResult:
        graph = self.train_graph
        graph.check_batch(tokens_BS, targets_BS)
        with torch.no_grad():
            outputs = self._run(list(params), tokens_BS, targets_BS)
        self.steps += 1
        num_params = graph.num_params
        return StepResult(
            loss=outputs[0], grads=list(outputs[1 : 1 + num_params]), keep=list(outputs[1 + num_params :])
        )

    def _run(self, params: list[torch.Tensor], tokens_BS: torch.Tensor, targets_BS: torch.Tensor):
        run = lambda: self.program(*params, tokens_BS, targets_BS)  # noqa: E731
        if self.kind != "cudagraph":
            return run()
        if self.steps < self.config.warmup:
            self._side = self._side or torch.cuda.Stream()
            for phase in self.program.phases:
                if not isinstance(phase.impl, WarmPhase):
                    phase.impl = WarmPhase(phase.module.forward)
            return warm_up_on_side_stream(run, self._side)
        if self._params is None:
            self._arm_graphs(params)
        elif any(p is not q for p, q in zip(params, self._params)):
            raise ValueError("the CUDA graphs were captured for other parameter tensors; update parameters in place")
        return run()

    def time_replays(self, on: bool) -> None:
        """Start timing every graph replay with CUDA events (forgetting earlier timings), or stop.

        Each phase's device time then comes without a profiler (``replay_ms``): a profiler's own cost
        per kernel can widen the gaps it reports. Nothing is timed for phases that are not graphed.
        """
        self._timing = on
        for phase in self._graphed():
            phase.impl.replay_events = [] if on else None

    def replay_ms(self) -> dict[str, list[float]]:
        """Phase -> ms of each replay timed since ``time_replays(True)`` (input copies and graph, by events)."""
        return {phase.phase: phase.impl.replay_ms() for phase in self._graphed() if phase.impl.replay_events}

    def held_replay_ms(self, phase: str, repeats: int) -> list[float]:
        """Ms of ``repeats`` replays of ``phase``'s graph alone with the host ahead ([] when it is not graphed):
        ``GraphedPhase.held_replay_ms``. Only for phases without side effects on the step's state (the forward)."""
        for graphed in self._graphed():
            if graphed.phase == phase:
                return graphed.impl.held_replay_ms(repeats)
        return []

    def _graphed(self) -> list:
        return [phase for phase in self.program.phases if isinstance(phase.impl, GraphedPhase)]

    def capture_reruns(self) -> dict[str, list[str]]:
        """Phase -> how its capture inputs differed from its warm-up inputs, for each graphed phase that had to
        run once uncaptured before its capture (that run holds its inputs and all its outputs at once)."""
        return {phase.phase: phase.impl.capture_differences for phase in self.program.phases
                if isinstance(phase.impl, GraphedPhase) and phase.impl.capture_differences}

    def close(self) -> None:
        """Destroy this executor's CUDA graphs and what they own (nothing to do for other executors).

        Call it before tearing down the process group: NCCL's teardown waits forever while a graph that
        captured its collectives is alive (lancet's own ranks do it in ``shutdown_runtime``). A later
        call of the executor warms up and captures again.
        """
        for phase in self.program.phases:
            if isinstance(phase.impl, GraphedPhase):
                phase.impl.release()
            phase.impl = phase.module.forward
        self.steps, self._params = 0, None

    def _arm_graphs(self, params: list[torch.Tensor]) -> None:
        """Capture every phase on its next call; parameters are read where they are."""
        self._params = params
        fixed = {p.untyped_storage().data_ptr() for p in params}
        pool = torch.cuda.graph_pool_handle()
        for phase in self.program.phases:
            kept = forward_outputs_kept(self.program.top, phase)
            warm = phase.impl.signature if isinstance(phase.impl, WarmPhase) else None
            phase.impl = GraphedPhase(phase.module.forward, pool, fixed, kept, warm)
            phase.impl.replay_events = [] if self._timing else None


def make_executor(train_graph: TrainGraph, kind: str | None = None, *,
                  progress: Callable[[CompileEvent], None] | None = None,
                  functions: dict[str, Callable] | None = None, **options) -> StepExecutor:
    """A StepExecutor of ``kind`` (None: the default for the graph and device); ``options`` go to ExecutorConfig.

    ``functions``: a store of compiled regions shared with other executors of this process (regions
    alike in structure and shapes, e.g. in two plans of one step, then compile once).
    """
    return StepExecutor(train_graph, ExecutorConfig(kind=kind, **options), progress, functions)
