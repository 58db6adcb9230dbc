"""One training step as a pure function of (parameters, batch).

The same function runs eagerly (the ``eager`` mode) and is what ``capture``
traces. It computes forward, loss and backward with ``torch.autograd.grad``,
then averages the gradients of replicated (data-parallel) parameters with
bucketed functional all-reduces. Expert parameters live on one rank only; their
gradients already hold every rank's tokens (the all-to-all's backward brought
them home), so they are not reduced.

Graph nodes traced from this function carry ``meta["custom"]["phase"]``
(``forward`` or ``backward``; the gradient all-reduce counts as backward).
Run eagerly, each phase is also a ``torch.profiler.record_function`` range
(``lancet/forward``, ``lancet/backward``), as in the executors of captured
graphs; traced (``make_fx``, ``torch.compile``), it is not.

Scaling: each rank differentiates ``local_loss / W`` and the dense gradients
are summed, so every gradient equals that of the mean over ranks of the local
losses -- what one process holding all experts and the global batch computes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.fx.traceback as fx_traceback
from torch import Tensor, fx, nn
from torch.func import functional_call

from lancet.step.output_tree import OutputTree
from lancet.moe.experts import GroupedExperts
from lancet.graph import meta

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024
PHASE_ANNOTATION = "lancet/{phase}"
"""``torch.profiler.record_function`` name of each phase of a step run (``lancet/forward``, ``lancet/backward``)."""


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Parameters of lancet's own expert layers (``GroupedExperts``): a hint, checked against the graph by
    ``lancet.Step``."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters())
    return names


def plan_buckets(sizes_bytes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets of about ``bucket_bytes``, last parameter first (as DDP does)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in reversed(range(len(sizes_bytes))):
        current.append(index)
        filled += sizes_bytes[index]
        if filled >= bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


def allreduce_buckets(grads: list[Tensor], buckets: list[list[int]], group: dist.ProcessGroup) -> list[Tensor]:
    """Sum each bucket of gradients across ``group`` with one functional all-reduce per bucket."""
    out = list(grads)
    for bucket in buckets:
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        flat = funcol.all_reduce(flat, "sum", group)
        for i, piece in zip(bucket, flat.split([grads[i].numel() for i in bucket])):
            out[i] = piece.view_as(grads[i])
    return out


def is_tracing() -> bool:
    """Whether this runs under a tracer (``torch.compile`` or ``make_fx``): no profiler ranges, no eager-only work."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None


@contextlib.contextmanager
def _phase(name: str):
    """The phase annotation of traced nodes; a profiler range when run eagerly."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(fx_traceback.annotate({meta.PHASE: name}))
        if not is_tracing():
            stack.enter_context(torch.profiler.record_function(PHASE_ANNOTATION.format(phase=name)))
        yield


@dataclass(slots=True)
class StepResult:
    loss: Tensor
    """This rank's loss (0-dim, float32)."""
    grads: list[Tensor]
    """One gradient per parameter, in ``TrainStep.param_names`` order."""
    keep: list[Tensor]
    """Per MoE layer, which token choices were dispatched."""


class TrainStep:
    """``(params, tokens, targets) -> (loss, grads, keep)`` for one expert-parallel rank.

    ``group`` is the expert- and data-parallel group (None: a single process
    with all experts). ``autocast_dtype`` enables mixed precision for the
    forward (parameters and gradients stay in their own dtype). ``loss_fn(output,
    targets)`` turns the model's output into the loss (default: the model's own
    ``loss`` method); the output's ``keep``, when it has one, lists each MoE
    layer's keep mask. ``expert_names`` are the expert-local parameters, whose
    gradients are not all-reduced (None: those of lancet's ``GroupedExperts``).
    """

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None,
        autocast_dtype: torch.dtype | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        loss_fn=None,
        expert_names: set[str] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else model.loss
        self.group = group
        self.world_size = 1 if group is None else dist.get_world_size(group)
        self.autocast_dtype = autocast_dtype
        named = list(model.named_parameters())
        self.param_names = [name for name, _ in named]
        experts = expert_parameter_names(model) if expert_names is None else set(expert_names)
        unknown = experts - set(self.param_names)
        if unknown:
            raise ValueError(f"expert parameters {sorted(unknown)} are not parameters of the model")
        self.expert_names = experts
        self.dense_indices = [i for i, (name, _) in enumerate(named) if name not in experts]
        sizes = [named[i][1].numel() * named[i][1].element_size() for i in self.dense_indices]
        self.buckets = [[self.dense_indices[j] for j in b] for b in plan_buckets(sizes, bucket_bytes)]
        self.forward_graph: fx.GraphModule | None = None
        self.forward_output: OutputTree | None = None

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.model.named_parameters()]

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def model_output(self, params: list[Tensor], tokens_BS: Tensor):
        """The model's output on ``tokens_BS`` with ``params`` (under the step's autocast)."""
        state = dict(zip(self.param_names, params))
        with self._autocast(tokens_BS.device.type):
            return functional_call(self.model, state, (tokens_BS,))

    def forward_loss(self, params: list[Tensor], tokens_BS: Tensor, targets_BS: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Loss and keep masks. Runs the model, or the forward graph when one is set (``with_forward_graph``)."""
        if self.forward_graph is None:
            out = self.model_output(params, tokens_BS)
        else:
            tensors = fx.Interpreter(self.forward_graph).run(*params, tokens_BS, targets_BS)
            out = self.forward_output.rebuild(list(tensors))
        with self._autocast(tokens_BS.device.type):
            return self.loss_fn(out, targets_BS), list(getattr(out, "keep", ()))

    def with_forward_graph(self, forward_graph: fx.GraphModule, output: OutputTree) -> TrainStep:
        """The same step with its model replaced by ``forward_graph`` ((params, tokens, targets) -> the
        output's tensors, which ``output`` rebuilds into the model's output for the loss function).

        Autograd differentiates the graph's ops, so a rewritten forward gets the
        matching backward; the loss function runs as it does on the model, with its own backward.
        """
        step = copy.copy(self)
        step.forward_graph = forward_graph
        step.forward_output = output
        return step

    def __call__(self, params: list[Tensor], tokens_BS: Tensor, targets_BS: Tensor) -> StepResult:
        with _phase("forward"):
            loss, keep = self.forward_loss(params, tokens_BS, targets_BS)
            scaled = loss / self.world_size
        with _phase("backward"):
            grads = list(torch.autograd.grad(scaled, params))
            if self.group is not None and self.world_size > 1:
                grads = allreduce_buckets(grads, self.buckets, self.group)
        return StepResult(loss=loss.detach(), grads=grads, keep=keep)


def apply_gradients(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]) -> None:
    """Hand ``grads`` to ``params`` (same order), step ``optimizer`` and clear them."""
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
