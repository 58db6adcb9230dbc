"""Capture one whole training step as one fx graph.

``capture_step`` traces ``TrainStep`` -- forward, loss, backward and the
bucketed data-parallel all-reduce -- with ``make_fx(tracing_mode="symbolic")``.
Inputs are fake tensors with static shapes (parameters and batch have fixed
shapes), while values read back to the host (``.tolist()`` of the routing
counts) become unbacked symbols: the split sizes of every irregular
all-to-all stay data-dependent and are recomputed on each replay.

Forward nodes carry ``node.meta["custom"]["module"]``, the qualified name of
the module that produced them.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx.traceback as fx_traceback
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

from lancet.capture.attention_seeds import detach_attention_seeds
from lancet.capture.param_casts import batch_parameter_casts
from lancet.step.output_tree import OutputTree, flatten_output
from lancet.step.train_step import TrainStep
from lancet.graph import meta

_TORCH_DIR = os.path.dirname(torch.__file__)


class CaptureError(RuntimeError):
    """The step could not be traced; the message names the op, the module and the source line."""


@dataclass(slots=True)
class TrainGraph:
    """A captured training step.

    Inputs: ``num_params`` parameters (``param_names`` order), then tokens,
    then targets. Outputs: loss, ``num_params`` gradients, then one keep mask
    per MoE layer.
    """

    gm: fx.GraphModule
    param_names: list[str]
    batch_shape: tuple[int, ...]
    device: torch.device
    target_shape: tuple[int, ...] | None = None
    """Shape of the targets (None: ``batch_shape``, as for token targets of a language model)."""

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    def check_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Refuse a batch of other shapes than the one the graph was captured on (its shapes are baked in)."""
        want = (self.batch_shape, self.target_shape if self.target_shape is not None else self.batch_shape)
        got = (tuple(inputs.shape), tuple(targets.shape))
        if got != want:
            raise ValueError(f"batch of shapes {got[0]} (inputs) and {got[1]} (targets) given to a graph captured "
                             f"for {want[0]} and {want[1]}; capture again for a new batch shape")

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


@contextlib.contextmanager
def _module_annotations(root: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """Annotate traced nodes with their module; yields the live module stack (for error messages)."""
    names = {id(m): name for name, m in root.named_modules()}
    stack: list[tuple[str, str]] = []
    contexts: list[contextlib.AbstractContextManager] = []

    def enter(module, args):
        name = names.get(id(module))
        if name is None:
            return
        stack.append((name or "<model>", type(module).__name__))
        ctx = fx_traceback.annotate({meta.MODULE: name or "<model>"})
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, output):
        if id(module) in names and stack:
            stack.pop()
            contexts.pop().__exit__(None, None, None)

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()
        while contexts:
            contexts.pop().__exit__(None, None, None)


def _failing_op(tb) -> str | None:
    """The op being dispatched when tracing failed: the innermost aten op or torch function in the traceback."""
    op = None
    while tb is not None:
        frame = tb.tb_frame
        for local in ("func", "self"):
            candidate = frame.f_locals.get(local)
            if isinstance(candidate, torch._ops.OpOverload):
                op = str(candidate)
        candidate = frame.f_locals.get("func")
        if frame.f_code.co_name == "__torch_function__" and callable(candidate):
            op = getattr(candidate, "__qualname__", None) or repr(candidate)
        tb = tb.tb_next
    return op


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch itself: the model line that could not be traced."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
    return frames[-1] if frames else None


def describe_capture_failure(err: BaseException, module_stack: list[tuple[str, str]]) -> str:
    op = _failing_op(err.__traceback__)
    frame = _user_frame(err)
    where = f"module {module_stack[-1][0]!r} ({module_stack[-1][1]})" if module_stack else "the step function"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    lines = [f"cannot capture the training step: {type(err).__name__} in {where}"]
    if op:
        lines.append(f"  op: {op}")
    if frame is not None:
        source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        lines.append(f"  at {frame.filename}:{frame.lineno}: {source}")
    lines.append(f"  reason: {reason}")
    if "data-dependent" in reason or "GuardOnDataDependent" in type(err).__name__:
        lines.append(
            "  hint: Python control flow on tensor values cannot be captured; express the decision with tensor "
            "ops (torch.where, masks) instead"
        )
    return "\n".join(lines)


_INPLACE_COLLECTIVES = {
    "alltoall_base_": "all_to_all_single_autograd",
    "alltoall_": "all_to_all_single_autograd",
    "allreduce_": "all_reduce",
    "allgather_": "all_gather_tensor",
    "_allgather_base_": "all_gather_tensor",
    "reduce_scatter_": "reduce_scatter_tensor",
    "_reduce_scatter_base_": "reduce_scatter_tensor",
    "broadcast_": "broadcast",
}


class _RefuseInPlaceCollectives(TorchDispatchMode):
    """Raises on in-place c10d collectives (``torch.distributed.all_to_all_single``, ...) while tracing.

    Such a collective writes into a tensor behind autograd's back (its gradient is silently missing) and is no
    collective start/wait pair a schedule could move; functional collectives are both.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func._schema.name.split("::")[-1]
            use = _INPLACE_COLLECTIVES.get(name, "the functional equivalent")
            raise CaptureError(
                f"in-place c10d collective {func} (torch.distributed.*) cannot be captured: autograd and the "
                f"schedule do not see it; call torch.distributed._functional_collectives.{use} instead"
            )
        return func(*args, **(kwargs or {}))


def fake_inputs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fake copies with static shapes, sharing one shape environment for unbacked symbols."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True, allow_non_fake_inputs=False)
    return [mode.from_tensor(t, static_shapes=True) for t in tensors]


def _trace(fn, inputs: list[torch.Tensor], model: nn.Module) -> fx.GraphModule:
    """make_fx over static-shape fake inputs, with module annotations and readable failures."""
    fakes = fake_inputs(inputs)
    # Annotations still open when tracing fails are closed by ``_module_annotations`` first; then
    # ``preserve_node_meta`` restores the annotations as they were, so a failed capture leaks none.
    with fx_traceback.preserve_node_meta(), _module_annotations(model) as module_stack:
        try:
            # Stack traces name the user's line in reports (partition findings); they are not part of fingerprints.
            return make_fx(_refusing_inplace_collectives(fn), tracing_mode="symbolic", record_stack_traces=True)(*fakes)
        except Exception as err:
            raise CaptureError(describe_capture_failure(err, list(module_stack))) from err


def _refusing_inplace_collectives(fn):
    def traced(*inputs):
        with _RefuseInPlaceCollectives():
            return fn(*inputs)

    return traced


def capture_step(train_step: TrainStep, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> TrainGraph:
    """Trace ``train_step`` on a batch shaped like ``tokens_BS`` into a TrainGraph.

    Raises CaptureError with the failing op, module and source line when the
    step cannot be traced.
    """
    params = train_step.parameters()
    num_params = len(params)

    def flat_step(*inputs: torch.Tensor):
        result = train_step(list(inputs[:num_params]), inputs[num_params], inputs[num_params + 1])
        return (result.loss, *result.grads, *result.keep)

    gm = _trace(flat_step, [*params, tokens_BS, targets_BS], train_step.model)
    batch_parameter_casts(gm, num_params)
    detach_attention_seeds(gm)
    return TrainGraph(
        gm=gm,
        param_names=list(train_step.param_names),
        batch_shape=tuple(tokens_BS.shape),
        device=tokens_BS.device,
        target_shape=tuple(targets_BS.shape),
    )


@dataclass(slots=True)
class ForwardGraph:
    """The forward of a step: inputs are the parameters, tokens, targets; outputs the model output's tensors.

    ``output`` rebuilds the model's output from the graph's outputs; the step's loss function then
    runs on it (``TrainStep.with_forward_graph``), so the loss is not part of this graph. Nodes keep
    the trace's ``val`` (fake tensors) and annotations, which the partition pass reads.
    """

    gm: fx.GraphModule
    param_names: list[str]
    batch_shape: tuple[int, ...]
    output: OutputTree | None = None
    """How the graph's outputs make the model's output (None: a graph built by hand, which cannot run a step)."""

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph


def capture_forward(train_step: TrainStep, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> ForwardGraph:
    """Trace only the model of ``train_step``, up to its output (autocast applied inside the graph)."""
    params = train_step.parameters()
    num_params = len(params)
    trees: list[OutputTree] = []

    def flat_forward(*inputs: torch.Tensor):
        with fx_traceback.annotate({meta.PHASE: meta.FORWARD}):
            out = train_step.model_output(list(inputs[:num_params]), inputs[num_params])
        tensors, tree = flatten_output(out)
        trees.append(tree)
        return tuple(tensors)

    gm = _trace(flat_forward, [*params, tokens_BS, targets_BS], train_step.model)
    return ForwardGraph(gm=gm, param_names=list(train_step.param_names), batch_shape=tuple(tokens_BS.shape),
                        output=trees[-1])


def capture_step_from_forward(
    train_step: TrainStep, forward_graph: ForwardGraph, tokens_BS: torch.Tensor, targets_BS: torch.Tensor
) -> TrainGraph:
    """The whole step whose forward is ``forward_graph`` (e.g. rewritten by a pass); autograd derives its backward.

    Annotations of the forward graph's nodes carry over to the nodes they become.
    """
    if forward_graph.output is None:
        raise ValueError("this forward graph does not say how its outputs make the model's output "
                         "(make it with capture_forward)")
    return capture_step(train_step.with_forward_graph(forward_graph.gm, forward_graph.output), tokens_BS, targets_BS)
