"""Replay each phase of a step program as a CUDA graph, collectives included.

A step can be graphed only when nothing in it needs the host: no host sync, no
host wait, no asynchronous copy to the host, no data-dependent size (the ragged
dispatch reads split sizes on the host). ``graph_blockers`` names what stands in
the way.

Capture (``GraphedPhase``): after warm-up steps on a side stream (Inductor has
compiled and autotuned, NCCL communicators exist), each phase is captured once
into a ``torch.cuda.CUDAGraph``. A phase whose capture inputs differ in any
property a compiled region guards on (device, dtype, shape, strides, aliasing)
from those of its last warm-up call first runs once more, uncaptured, on exactly
those inputs, so that nothing compiles inside the capture (a recompile there is
an error); that run keeps the phase's inputs alive while it makes all of its
outputs, so a phase whose inputs are as in the warm-up skips it. The phases
share one memory pool, so the forward's outputs that the backward reads stay
where the backward graph expects them, and the backward, which frees them at
their last use while it is captured, reuses their memory as the step does
without graphs. Each collective's start and its
wait lie in the same phase, so in the same graph. Inputs that live at fixed
addresses (parameters, updated in place by the optimizer; outputs of an earlier
phase's graph) are read where they are; every other input (the batch) is copied
into a buffer the graph owns before each replay. Outputs are tensors the graph
owns: the next replay overwrites them, so the caller consumes them (the
optimizer applies the gradients) before it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import fx

from lancet.graph import meta
from lancet.graph.regions import first_backward_node, is_dynamic
from lancet.graph.roles import TO_HOST_OPS, Role, node_role, wait_of


class GraphCaptureError(RuntimeError):
    """The step cannot be captured as CUDA graphs; the message names the node that needs the host."""


def _describe(node: fx.Node, what: str) -> str:
    module = meta.module(node)
    return f"{what} {node.name} ({node.target}{f', module {module}' if module else ''})"


def graph_blockers(graph: fx.Graph) -> list[str]:
    """Why ``graph`` cannot be replayed as CUDA graphs: one line per node that needs the host, or per
    collective awaited in another phase than it starts in (phases are captured apart) ([] if none)."""
    blockers = []
    first = first_backward_node(graph)
    position = {node: i for i, node in enumerate(graph.nodes)}
    cut = position[first] if first is not None else len(position)
    for node in graph.nodes:
        role = node_role(node)
        if role == Role.HOST_SYNC:
            blockers.append(_describe(node, "host sync"))
        elif role == Role.HOST_WAIT:
            blockers.append(_describe(node, "host wait"))
        elif node.target in TO_HOST_OPS:
            blockers.append(_describe(node, "copy to the host"))
        elif role == Role.COMM_START and is_dynamic(node):
            blockers.append(_describe(node, "collective with data-dependent sizes"))
        if role == Role.COMM_START and (position[node] < cut) != (position[wait_of(node)] < cut):
            blockers.append(_describe(node, "collective awaited in the other phase:"))
    return blockers


def why_not_graphed(graph: fx.Graph, device: torch.device) -> str | None:
    """A one-line reason the step cannot run as CUDA graphs on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this step runs on {device.type}"
    blockers = graph_blockers(graph)
    if not blockers:
        return None
    more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
    return f"the step waits for the host at {blockers[0]}{more}"


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def input_signature(args: list) -> tuple:
    """What a compiled region's guards may look at in ``args``: per tensor its device, dtype, shape, strides,
    storage offset, 16-byte alignment and the first earlier argument sharing its storage; other values as
    they are (their type where they do not compare by value)."""
    first: dict[int, int] = {}
    signature = []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            storage = _storage(arg)
            signature.append((arg.device, arg.dtype, tuple(arg.shape), tuple(arg.stride()), arg.storage_offset(),
                              arg.data_ptr() % 16 == 0, first.setdefault(storage, i)))
        elif arg is None or isinstance(arg, (bool, int, float, str, torch.dtype, torch.device)):
            signature.append(arg)
        else:
            signature.append(type(arg))
    return tuple(signature)


def signature_differences(warm: tuple | None, now: tuple) -> list[str]:
    """One line per argument whose signature differs between a warm-up call and the capture."""
    if warm is None:
        return ["no warm-up call was recorded"]
    if len(warm) != len(now):
        return [f"{len(warm)} arguments in the warm-up, {len(now)} at the capture"]
    return [f"argument {i}: {a} in the warm-up, {b} at the capture" for i, (a, b) in enumerate(zip(warm, now)) if a != b]


HOLD_CYCLES = 20_000_000
"""GPU clock cycles of the sleep kernel that holds the stream while the host launches a held replay (~10 ms)."""


class WarmPhase:
    """A phase run uncaptured (a warm-up step) that remembers the ``input_signature`` of its last call."""

    def __init__(self, run: Callable) -> None:
        self.run = run
        self.signature: tuple | None = None

    def __call__(self, args: list):
        self.signature = input_signature(args)
        return self.run(args)


class GraphedPhase:
    """One phase of a program, captured on its first call and replayed on every later call.

    Called like a ``PhaseCall``'s module: with its arguments in a list, which it empties. ``fixed`` holds
    the storage addresses of inputs that stay put between calls (read where they are; at a replay the
    argument in their place is not looked at, and may be None); inputs elsewhere are copied into
    graph-owned buffers on every replay. ``kept``: indices of the outputs that the program returns (None:
    all); the phase keeps only those between calls. The others only feed a later phase, which frees them
    at their last use while it is captured, so its graph may reuse their memory, as the step does
    when it is not graphed; at a replay they come back as None. ``warm_signature``: the
    ``input_signature`` of the phase's last warm-up call (None: unknown, so it runs once uncaptured
    before the capture).
    """

    def __init__(self, run: Callable, pool, fixed: set[int], kept: set[int] | None = None,
                 warm_signature: tuple | None = None) -> None:
        self.run = run
        self.warm_signature = warm_signature
        self.capture_differences: list[str] | None = None
        """How the capture's inputs differed from the warm-up's (None until captured; empty: they did not,
        and the phase was captured without running it uncaptured first)."""
        self.pool = pool
        self.fixed = fixed
        self.kept = kept
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: dict[int, torch.Tensor] = {}
        self.outputs = None
        self.replay_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        """When a list: a pair of timing events around each replay (its input copies and the graph) is
        appended to it, for the phase's device time without a profiler (``replay_ms``)."""
        _PHASES.add(self)

    def release(self) -> None:
        """Destroy the captured graph and what it owns; the next call captures again."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.outputs = None, None
        self.buffers.clear()

    def __call__(self, args: list):
        if self.graph is None:
            return self._capture(args)
        events = None
        if self.replay_events is not None:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        for i, buffer in self.buffers.items():
            buffer.copy_(args[i])
        args.clear()
        self.graph.replay()
        if events is not None:
            events[1].record()
            self.replay_events.append(events)
        return self.outputs

    def replay_ms(self) -> list[float]:
        """Ms between the events around each replay timed so far (synchronizes with the device)."""
        if not self.replay_events:
            return []
        self.replay_events[-1][1].synchronize()
        return [start.elapsed_time(end) for start, end in self.replay_events]

    def held_replay_ms(self, repeats: int, hold_cycles: int = HOLD_CYCLES) -> list[float]:
        """Ms of ``repeats`` replays of the captured graph alone, each queued behind a sleep kernel.

        The host has launched the graph before the GPU reaches the start event, so the time is the graph's
        own (its kernels and the GPU's waits between them), without the host's launch latency that a replay
        at the start of a synchronized step includes. The graph reads the buffers of its last replay.
        """
        if self.graph is None:
            raise RuntimeError("held_replay_ms: the phase has not been captured yet")
        pairs = []
        for _ in range(repeats):
            torch.cuda._sleep(hold_cycles)
            pair = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            pair[0].record()
            self.graph.replay()
            pair[1].record()
            pairs.append(pair)
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in pairs]

    def _capture(self, args: list):
        """Capture the phase on ``args`` and replay it once; returns every output (the later phases' too)."""
        inputs = list(args)
        args.clear()
        for i, arg in enumerate(inputs):
            if isinstance(arg, torch.Tensor) and _storage(arg) not in self.fixed:
                inputs[i] = self.buffers[i] = arg.clone()
        # Inputs unlike the warm-up's: one run outside the capture on exactly these inputs, so that whatever it
        # compiles or initialises lazily for them (a recompile for new input properties) happens here.
        self.capture_differences = signature_differences(self.warm_signature, input_signature(inputs))
        if self.capture_differences:
            self.run(list(inputs))
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.compiler.set_stance("fail_on_recompile"), \
                    torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.run(inputs)
        except RuntimeError as error:
            self.graph = None
            raise GraphCaptureError(f"capturing a phase as a CUDA graph failed: {error}") from error
        self.fixed.update(_storage(t) for t in _tensors(outputs))
        self.graph.replay()
        self.outputs = outputs if self.kept is None else tuple(
            out if i in self.kept else None for i, out in enumerate(outputs))
        return outputs


_PHASES: weakref.WeakSet[GraphedPhase] = weakref.WeakSet()
"""Every GraphedPhase of this process that is still referenced."""


def release_graphs() -> int:
    """Destroy every CUDA graph this process captured and still holds; returns how many.

    Call before the process group goes: NCCL's ``destroy_process_group`` waits forever while a captured
    graph that holds NCCL work is alive (measured on an H200 with torch 2.11: a rank whose executor was
    still referenced never exited; with its graphs destroyed first, the group went in 0.4 s).
    """
    live = [phase for phase in list(_PHASES) if phase.graph is not None]
    for phase in live:
        phase.release()
    return len(live)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def warm_up_on_side_stream(run: Callable[[], object], side: torch.cuda.Stream) -> object:
    """Run ``run()`` on the stream ``side`` (as capture needs: lazy initialisation off the capturing stream).

    ``side`` first waits for the current stream (so it never overwrites memory that earlier work there
    still reads); the current stream then waits for ``side`` (the results are ready where they are used).
    """
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = run()
    torch.cuda.current_stream().wait_stream(side)
    return result
