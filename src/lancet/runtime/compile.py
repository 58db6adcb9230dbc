"""Compile the regions of a step program with ``torch.compile`` (Inductor by default), once per distinct region.

Each region is compiled when it first runs, on its real inputs (static shapes:
``dynamic=False``; ``fullgraph=True``, as a region holds nothing Inductor cannot
take), after its padded-dispatch ops are traced through their implementations
(``lancet.runtime.inline_ops``) so that Inductor fuses them. ``torch.compile``
rather than ``torch._inductor.compile``: the latter has no shape environment,
so Inductor's FX-graph cache refuses it ("No shape env") and every process
would compile from scratch.

Regions with the same structure and the same input shapes (the same block of
different layers; the same region in two plans of one step, given one
``functions`` store) share one compiled function: the first compile serves them
all in this process. Across processes, Inductor's on-disk caches (FX-graph and
AOTAutograd caches, under ``TORCHINDUCTOR_CACHE_DIR``) make a repeated compile a
cache hit; the report counts both.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import fx

from lancet.runtime.inductor_options import compile_options
from lancet.runtime.inline_ops import inline_lancet_ops
from lancet.runtime.program import RegionCall

_CACHE_COUNTERS = {
    "fxgraph_cache_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_cache_miss": ("inductor", "fxgraph_cache_miss"),
    "aot_cache_hit": ("aot_autograd", "autograd_cache_hit"),
    "aot_cache_miss": ("aot_autograd", "autograd_cache_miss"),
}


@dataclass(slots=True)
class CompileReport:
    """What compiling one step program cost."""

    regions: int = 0
    """Regions of the step graph (compiled or not)."""
    compiled_regions: int = 0
    """Regions run compiled."""
    compiles: int = 0
    """Distinct compiled functions (regions alike in structure and shapes share one)."""
    shared: int = 0
    """Compiled regions that reused another region's compiled function."""
    interpreted_regions: dict[str, int] = field(default_factory=dict)
    """Regions run as traced, by reason (``dynamic``: data-dependent sizes; ``small``: too few kernels)."""
    failed: list[str] = field(default_factory=list)
    """Regions whose compile failed, each with the first line of the error; they run as traced."""
    seconds: float = 0.0
    """Wall time of the first calls of the compiled functions (compile plus one run)."""
    cache: dict[str, int] = field(default_factory=dict)
    """Inductor FX-graph and AOTAutograd cache hits and misses during those compiles."""
    inlined_collectives: int = 0
    """Collectives run as blocking calls on the compute stream (``ExecutorConfig.inline_collectives``)."""

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        interpreted = ", ".join(f"{n} {reason}" for reason, n in sorted(self.interpreted_regions.items()))
        hits = self.cache.get("fxgraph_cache_hit", 0)
        misses = self.cache.get("fxgraph_cache_miss", 0)
        return (f"{self.compiled_regions} of {self.regions} regions compiled ({self.compiles} distinct, "
                f"{self.shared} shared) in {self.seconds:.1f} s; Inductor cache {hits} hit(s), {misses} miss(es)"
                + (f"; run as traced: {interpreted}" if interpreted else "")
                + (f"; {self.inlined_collectives} collective(s) on the compute stream"
                   if self.inlined_collectives else "")
                + (f"; {len(self.failed)} failed to compile and run as traced, first: {self.failed[0]}"
                   if self.failed else ""))


@dataclass(frozen=True, slots=True)
class CompileEvent:
    """Progress of compiling a program: one event per compiled region as it becomes ready."""

    done: int
    total: int
    region: int
    phase: str
    seconds: float
    shared: bool
    summary: str | None = None
    """On the last region's event: the whole program's ``CompileReport.summary()``."""


def _value_spec(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(value.shape)},{value.stride()},{value.device},{value.requires_grad})"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value_spec(v) for v in value) + "]"
    return repr(value)


def region_key(module: fx.GraphModule, args: tuple) -> str:
    """Structure of a region module (ops and wiring, not node names) plus its inputs' shapes, strides, dtypes.

    Constants a region reads (``get_attr``) are told apart by identity: regions share a compiled
    function only when they read the same constant objects.
    """
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(module.graph.nodes):
        index[node] = i
        ref = lambda n: f"%{index[n]}"  # noqa: E731
        target = {"placeholder": "", "get_attr": f"id{id(getattr(module, str(node.target), None))}"}.get(
            node.op, node.target)
        lines.append(f"{node.op}|{target}|{fx.node.map_arg(node.args, ref)}|{fx.node.map_arg(node.kwargs, ref)}")
    lines.extend(_value_spec(a) for a in args)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {name: counters[group][key] for name, (group, key) in _CACHE_COUNTERS.items()}


class RegionCompiler:
    """Compiles region calls on their first call; identical regions share one compiled function."""

    def __init__(self, backend: str = "inductor", total: int = 0,
                 progress: Callable[[CompileEvent], None] | None = None,
                 functions: dict[str, Callable] | None = None) -> None:
        self.backend = backend
        self.total = total
        self.progress = progress
        self.report = CompileReport()
        self._compiled = functions if functions is not None else {}
        """Region key -> compiled function; pass one store to several compilers to share across programs."""
        self._failed: dict[str, Exception] = {}
        """Region key -> the error its compile raised (regions alike run as traced without trying again)."""

    def attach(self, call: RegionCall) -> None:
        """Make ``call`` compile itself on its first call, then run compiled."""
        def first_call(*args):
            key = region_key(call.module, args)
            if key in self._failed:
                return self._run_as_traced(call, args, self._failed[key])
            shared = key in self._compiled
            if not shared:
                module = inline_lancet_ops(call.module, args)
                self._compiled[key] = torch.compile(module, backend=self.backend, fullgraph=True, dynamic=False,
                                                    **compile_options(self.backend))
            call.impl = self._compiled[key]
            begin, before = time.perf_counter(), _counters()
            try:
                result = call.impl(*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                self._failed[key] = error
                return self._run_as_traced(call, args, error)
            self._account(call, time.perf_counter() - begin, before, shared)
            return result

        call.impl = first_call

    def _run_as_traced(self, call: RegionCall, args: tuple, error: Exception):
        """A region whose compile failed runs as traced from now on; the report and a warning say which."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        what = f"{call.region.phase} region {call.region.index} ({type(error).__name__}: {first_line})"
        self.report.failed.append(what)
        warnings.warn(f"lancet: compiling {what} failed; it runs as traced (slower, same values)", stacklevel=2)
        call.impl = call.module.forward
        return call.impl(*args)

    def _account(self, call: RegionCall, seconds: float, before: dict[str, int], shared: bool) -> None:
        report = self.report
        report.compiled_regions += 1
        report.shared += int(shared)
        report.compiles += int(not shared)
        report.seconds += seconds
        for name, value in _counters().items():
            report.cache[name] = report.cache.get(name, 0) + value - before[name]
        if self.progress is not None:
            last = report.compiled_regions >= self.total
            self.progress(CompileEvent(report.compiled_regions, self.total, call.region.index, call.region.phase,
                                       seconds, shared, report.summary() if last else None))
