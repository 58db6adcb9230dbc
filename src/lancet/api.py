"""The public API: a step of your own MoE model, captured, profiled, planned and trained with the plan.

    step = lancet.Step(model, loss_fn, optimizer, group=ep_group)
    graph = lancet.capture_step(step, batch)
    profile = lancet.profile(step, batches)
    comm = lancet.profile_comm(ep_group, device)
    plan = lancet.optimize(step, batch, profile, comm)
    runner = lancet.Runner(step, plan)
    for batch in data:
        loss = runner.step(batch)

A batch is ``(inputs, targets)``, two tensors whose dim 0 is the batch (the
dim partitions split). The model runs as ``model(inputs)`` and the loss as
``loss_fn(output, targets)``; the model exchanges tokens with functional
collectives (``torch.distributed._functional_collectives``) over the group it
was given. Each rank differentiates its loss divided by the world size;
gradients of data-parallel parameters are summed across the group, those of
expert-local parameters are not (the all-to-all's backward already brought
every rank's tokens home).

Expert-local parameters are read from the captured graph: those whose
gradient comes back through a MoE layer's all-to-all
(``lancet.graph.expert_grads``). Given explicitly, they must match it; a
parameter on the wrong side is an ``ExpertParamError`` that names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lancet.capture.trace import TrainGraph, capture_step as capture_train_step
from lancet.cost.comm import CommProfile, measure_comm
from lancet.cost.profile import ComputeProfile, profile_graph
from lancet.graph.analysis import analyze
from lancet.graph.expert_grads import expert_gradient_layers
from lancet.plan.artifact import RunIdentity, device_description
from lancet.plan.optimize import PlanOptions, optimize_step
from lancet.plan.plan import Plan, build_step_graph
from lancet.runtime.executor import make_executor
from lancet.step.train_step import (
    DEFAULT_BUCKET_BYTES,
    StepResult,
    TrainStep,
    apply_gradients,
    expert_parameter_names,
)

Batch = Sequence[torch.Tensor]
_SHOWN = 8


class ExpertParamError(ValueError):
    """A parameter is treated as expert-local but its gradient says data-parallel, or the reverse."""


def _names_of(model: nn.Module, params: Iterable[str | nn.Parameter]) -> set[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    known = set(by_id.values())
    names = set()
    for param in params:
        name = param if isinstance(param, str) else by_id.get(id(param))
        if name not in known:
            shown = param if isinstance(param, str) else f"a tensor of shape {tuple(param.shape)}"
            raise ValueError(f"expert_params: {shown} is not a parameter of the model")
        names.add(name)
    return names


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_expert_params(found: dict[str, list[int]], declared: set[str]) -> None:
    """Raise ExpertParamError unless ``declared`` (expert-local) equals ``found`` (from the graph)."""
    problems = []
    dense = {n: found[n] for n in found if n not in declared}
    if dense:
        layers = sorted({i for n in dense for i in dense[n]})
        problems.append(
            f"the gradients of {_listing(dense)} come back through the all-to-all of MoE layer(s) {layers}, but "
            "these parameters are treated as data-parallel (their gradients would be summed across ranks, "
            "mixing different experts): declare them in expert_params"
        )
    extra = declared - set(found)
    if extra:
        problems.append(
            f"{_listing(extra)} are declared expert-local, but their gradients come back through no MoE "
            "all-to-all: as expert-local they would never be averaged across ranks; leave them out of "
            "expert_params"
        )
    if problems:
        raise ExpertParamError("; ".join(problems))


class Step:
    """One training step of ``model`` on one expert-parallel rank.

    ``group``: the expert- and data-parallel process group (None: one process
    holding every expert). ``expert_params``: names or parameters that live on
    this rank only (None: found from the graph). ``autocast_dtype``: mixed
    precision for the forward. ``bucket_bytes``: size of the gradient
    all-reduce buckets.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        optimizer: torch.optim.Optimizer,
        *,
        group: dist.ProcessGroup | None = None,
        expert_params: Iterable[str | nn.Parameter] | None = None,
        autocast_dtype: torch.dtype | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        name: str = "",
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.group = group
        self.name = name or type(model).__name__
        self.declared = None if expert_params is None else _names_of(model, expert_params)
        self._options = {"autocast_dtype": autocast_dtype, "bucket_bytes": bucket_bytes, "loss_fn": loss_fn}
        self._train_step: TrainStep | None = None

    @property
    def world_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.model.named_parameters()]

    def train_step(self, batch: Batch) -> TrainStep:
        """The step function, its expert-local parameters checked against the graph of ``batch``'s shape."""
        if self._train_step is None:
            self._train_step = self._make(self._expert_names(batch))
        return self._train_step

    @property
    def expert_params(self) -> set[str]:
        """The expert-local parameter names (known after the first capture)."""
        if self._train_step is None:
            raise RuntimeError("expert parameters are known once the step was captured (lancet.capture_step)")
        return set(self._train_step.expert_names)

    def _make(self, expert_names: set[str]) -> TrainStep:
        return TrainStep(self.model, self.group, expert_names=expert_names, **self._options)

    def _expert_names(self, batch: Batch) -> set[str]:
        hint = expert_parameter_names(self.model)
        if self.world_size == 1:
            return self.declared if self.declared is not None else hint
        # Captured with every parameter expert-local: the graph holds each raw gradient (no bucketed all-reduce).
        names = [name for name, _ in self.model.named_parameters()]
        probe = capture_train_step(self._make(set(names)), *batch)
        outputs = probe.graph.output_node().args[0]
        found = expert_gradient_layers(analyze(probe), names, list(outputs[1 : 1 + len(names)]))
        check_expert_params(found, self.declared if self.declared is not None else set(found) | hint)
        return set(found)

    def apply(self, result: StepResult) -> None:
        """Hand the gradients to the optimizer, step it and clear them."""
        apply_gradients(self.optimizer, self.params, result.grads)


def capture_step(step: Step, batch: Batch) -> TrainGraph:
    """The whole step (forward, loss, backward, gradient all-reduce) as one graph, for batches shaped like ``batch``."""
    inputs, targets = batch
    return capture_train_step(step.train_step(batch), inputs, targets)


def profile(step: Step, batches: Sequence[Batch], *, reps: int = 5, warmup: int = 2) -> ComputeProfile:
    """Time every compute node and collective of the captured step over ``batches`` (all ranks call it)."""
    graph = capture_step(step, batches[0])
    inputs = [[*step.params, *batch] for batch in batches]
    return profile_graph(graph.gm, inputs, graph.device, step.group, reps=reps, warmup=warmup)


def profile_comm(group: dist.ProcessGroup, device: torch.device, *, sizes: list[int] | None = None,
                 reps: int = 5) -> CommProfile:
    """Collective cost curves and compute/comm contention measured on ``group`` (all ranks call it)."""
    return measure_comm(group, device, sizes=sizes, reps=reps)


def _identity(step: Step, batch: Batch) -> RunIdentity:
    dtype = step._options["autocast_dtype"] or step.params[0].dtype
    return RunIdentity(model=step.name, gate="", world_size=step.world_size, dtype=str(dtype).removeprefix("torch."),
                       device=device_description(batch[0].device), network="native",
                       torch_version=torch.__version__.split("+")[0])


def optimize(step: Step, batch: Batch, profile: ComputeProfile, comm: CommProfile, *, dw: bool = True,
             partition: bool = True, max_partitions: int = 8, memory_cap_bytes: int | None = None) -> Plan:
    """The plan the simulator predicts fastest for ``step``: dW scheduling, partitioned ranges, or both.

    Every rank derives the same plan from the same (agreed) profiles. ``plan.selection`` reports the
    range search, ``plan.variants[...].predicted`` the simulated steps.
    """
    train_step = step.train_step(batch)
    options = PlanOptions(schedule_dw=dw, partition=partition, max_partitions=max_partitions,
                          memory_cap_bytes=memory_cap_bytes, progress=False)
    result = optimize_step(train_step, *batch, profile, comm, _identity(step, batch), options)
    return result.plan


class Runner:
    """Trains ``step`` with ``plan`` (None: the captured step as traced).

    ``variant``: which of the plan's variants runs (``lancet``, ``lancet-dw``, ``lancet-part``).
    ``executor``: ``interpret``, ``compiled``, ``cudagraph``, None (the fastest the graph and device allow),
    or ``eager`` (the step function op by op, no graph: the reference). The step is captured on the first
    batch; every later batch must have its shape. ``close()`` (or leaving a ``with`` block) destroys
    the CUDA graphs it replays, which must happen before the process group is torn down.
    """

    def __init__(self, step: Step, plan: Plan | None = None, *, variant: str = "lancet",
                 executor: str | None = None) -> None:
        self.owner = step
        self.plan = plan
        self.variant = variant
        self.executor = executor
        self._run = None
        self._params: list[torch.Tensor] = []

    def _build(self, batch: Batch):
        train_step = self.owner.train_step(batch)
        if self.executor == "eager":
            return train_step
        if self.plan is None:
            graph = capture_step(self.owner, batch)
        else:
            graph = build_step_graph(train_step, *batch, self.plan, self.variant)
        return make_executor(graph, self.executor)

    def __call__(self, batch: Batch) -> StepResult:
        """Loss, gradients (parameter order) and keep masks of one step; the parameters are not updated."""
        if self._run is None:
            self._run = self._build(batch)
            self._params = self.owner.params  # listed once: the step's tensors, updated in place
        return self._run(self._params, *batch)

    def step(self, batch: Batch) -> torch.Tensor:
        """One training step: run, then the optimizer update; returns this rank's loss."""
        result = self(batch)
        apply_gradients(self.owner.optimizer, self._params, result.grads)
        return result.loss

    def close(self) -> None:
        """Destroy the CUDA graphs this runner replays; call it (or use ``with Runner(...)``) before
        ``dist.destroy_process_group()``, whose NCCL teardown waits forever while such a graph is alive.
        A later step builds and captures again."""
        close = getattr(self._run, "close", None)
        if close is not None:
            close()
        self._run = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
