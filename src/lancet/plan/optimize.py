"""``lancet optimize``: from a compute profile and a comm profile to a plan, in one process.

The step graph is captured again on this machine with a fake process group of
the profile's world size (no communication happens while tracing), checked to
be the graph that was profiled, and handed to the passes. The plan holds three
variants: ``lancet-dw`` (order passes on the captured step), ``lancet-part``
(the partitions the range search chose) and ``lancet`` (partitions, then the
order passes; or ``lancet-dw`` when that is predicted faster).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from lancet.plan.artifact import ArtifactMismatch, RunIdentity, identity_from_json, read_artifact
from lancet.capture.trace import capture_forward, capture_step
from lancet.cost.comm import CommProfile
from lancet.cost.estimate import DerivedCostModel
from lancet.cost.executor import ExecutorCostModel
from lancet.cost.model import ProfiledCostModel, host_scale
from lancet.cost.profile import ComputeProfile, graph_fingerprint
from lancet.passes.partition.findings import Finding
from lancet.passes.partition.rewrite import drop_semantics, partition_pass
from lancet.passes.partition.select import select_partitions
from lancet.plan.plan import Plan, VariantPlan, capture_partitioned_step, choose_order
from lancet.sim.simulator import Timeline, simulate
from lancet.step.train_step import TrainStep


@dataclass(slots=True)
class OptimizeResult:
    plan: Plan
    unpriced: list[str]
    timelines: dict[str, Timeline]
    issue_ms: float = 0.0
    """Measured host time to issue the profiled step (0: not measured)."""
    host_scale: float = 1.0
    """Factor applied to per-node host times (``lancet.cost.model.host_scale``)."""


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of ``world_size`` ranks in this one process; collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("lancet optimize runs in a process without an initialised process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _load(profile_path: str, comm_path: str):
    profile_doc = read_artifact(profile_path, "profile")
    if profile_doc.get("tutel_parts", 1) != 1:
        raise ArtifactMismatch(
            f"{profile_path} profiles the tutel-d{profile_doc['tutel_parts']} step; optimize needs the captured "
            "step's profile (lancet profile without --tutel)"
        )
    comm_doc = read_artifact(comm_path, "comm")
    profile_identity = identity_from_json(profile_doc["identity"])
    comm_identity = identity_from_json(comm_doc["identity"])
    differences = [
        f"{f}: comm has {getattr(comm_identity, f)!r}, profile has {getattr(profile_identity, f)!r}"
        for f in ("world_size", "device", "torch_version")
        if getattr(comm_identity, f) != getattr(profile_identity, f)
    ]
    if differences:
        raise ArtifactMismatch(f"{comm_path} was measured for a different run: " + "; ".join(differences))
    return profile_doc, profile_identity, comm_identity, CommProfile.from_json(comm_doc["comm"])


def profile_for_network(profile_doc: dict, comm_network: str) -> ComputeProfile:
    """The profile of ``profile_doc`` for pricing under ``comm_network``.

    The collective times it measured hold only for the network it ran under; for another network they
    are dropped, and collectives are priced from that network's comm curves.
    """
    profile = ComputeProfile.from_json(profile_doc["profile"])
    if identity_from_json(profile_doc["identity"]).network != comm_network:
        return profile.without_comm_times()
    return profile


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """What the planner may try, and what it shows."""

    schedule_dw: bool = True
    partition: bool = True
    max_partitions: int = 8
    memory_cap_bytes: int | None = None
    """Cap on the extra bytes the dW moves may hold alive (None: no cap)."""
    trace_dir: str | None = None
    """Where the predicted timelines go as Chrome traces (None: nowhere)."""
    progress: bool = True


def optimize(
    profile_path: str,
    comm_path: str,
    options: PlanOptions = PlanOptions(),
    *,
    build_step: Callable[[dict], tuple[TrainStep, torch.Tensor, torch.Tensor]],
) -> OptimizeResult:
    """Plan from a profile and a comm profile; ``build_step(profile_document)`` rebuilds the profiled step
    (rank 0's view, under the fake group this function sets up) and a batch of its shape."""
    profile_doc, profile_identity, comm_identity, comm = _load(profile_path, comm_path)
    profile = profile_for_network(profile_doc, comm_identity.network)
    identity = replace(profile_identity, network=comm_identity.network)
    with fake_process_group(profile_identity.world_size):
        step, tokens, targets = build_step(profile_doc)
        return optimize_step(step, tokens, targets, profile, comm, identity, options)


def optimize_step(
    step: TrainStep,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    profile: ComputeProfile,
    comm: CommProfile,
    identity: RunIdentity,
    options: PlanOptions = PlanOptions(),
) -> OptimizeResult:
    """Plan for ``step`` (on whatever process group it holds; tracing communicates nothing) from a profile of
    its captured graph and a comm profile; ``identity`` is the run the plan is for."""
    schedule_dw, partition, memory_cap_bytes = options.schedule_dw, options.partition, options.memory_cap_bytes
    model_host = identity.device.startswith("cuda")
    measured = _for_executor(ProfiledCostModel(profile=profile, comm=comm, model_host=model_host), profile)
    timelines: dict[str, Timeline] = {}
    captured = capture_step(step, tokens, targets)
    fingerprint = graph_fingerprint(captured.graph)
    if fingerprint != profile.fingerprint:
        raise ArtifactMismatch(
            f"the graph captured here ({fingerprint}) is not the profiled graph ({profile.fingerprint}); "
            "optimize with the same lancet and torch on the same kind of device"
        )
    derived = _for_executor(DerivedCostModel.of_captured(profile, comm, captured.graph, model_host), profile)
    # The partitioned step is priced by the derived model, so the unpartitioned orders it competes
    # with are priced that way too (before and after the order passes, on the same graph).
    derived_ms = lambda: simulate(captured.graph, derived.costs(captured.graph)).makespan_ms  # noqa: E731
    unpartitioned_ms = {"captured": derived_ms()} if partition else {}
    order, timelines["captured"] = choose_order(
        captured, measured.costs(captured.graph), schedule_dw=schedule_dw, memory_cap_bytes=memory_cap_bytes
    )
    if partition:
        unpartitioned_ms["lancet-dw"] = derived_ms()
    plan = Plan(
        identity=identity,
        fingerprint=fingerprint,
        predicted=timelines["captured"].summary(),
        options={"dw": schedule_dw, "partition": partition, "max_partitions": options.max_partitions,
                 "memory_cap_bytes": memory_cap_bytes,
                 "executor": profile.executor.kind if profile.executor is not None else "interpret"},
    )
    plan.variants["lancet-dw"] = VariantPlan(
        dw=order.dw, allreduce=order.allreduce, step_fingerprint=fingerprint,
        predicted=order.timeline.summary(), chosen=order.name,
    )
    timelines["lancet-dw"] = order.timeline
    _partition_variants(plan, step, tokens, targets, derived, timelines, options, unpartitioned_ms)
    _add_optimizer(plan, timelines, profile.optimizer_ms)
    if options.trace_dir is not None:
        Path(options.trace_dir).mkdir(parents=True, exist_ok=True)
        for name, timeline in timelines.items():
            timeline.write_chrome_trace(str(Path(options.trace_dir) / f"predicted_{name}.json"))
    scale = host_scale(profile, comm, captured.graph) if model_host else 1.0
    return OptimizeResult(plan=plan, unpriced=list(measured.unpriced), timelines=timelines,
                          issue_ms=profile.issue_ms if model_host else 0.0, host_scale=scale)


def _for_executor(model, profile: ComputeProfile):
    """``model`` priced for the executor the profile measured (compiled regions, CUDA graphs), if any."""
    return model if profile.executor is None else ExecutorCostModel(model, profile.executor)


def _add_optimizer(plan: Plan, timelines: dict[str, Timeline], optimizer_ms: float) -> None:
    """Predicted steps include the measured optimizer update after the graph (the same for every variant)."""
    if optimizer_ms <= 0:
        return
    for timeline in {id(t): t for t in timelines.values()}.values():
        timeline.add_after("optimizer", optimizer_ms)
    summaries = {id(s): s for s in [plan.predicted, *(v.predicted for v in plan.variants.values())]}
    for summary in summaries.values():
        summary["makespan_ms"] += optimizer_ms
        summary["after_ms"] = summary.get("after_ms", 0.0) + optimizer_ms


def _partition_variants(
    plan: Plan, step, tokens, targets, derived: DerivedCostModel, timelines: dict, options: PlanOptions,
    unpartitioned_ms: dict[str, float],
) -> None:
    """Fill ``lancet-part`` and ``lancet``: the range search, then the order passes on the partitioned step."""
    forward = capture_forward(step, tokens, targets)
    plan.forward_fingerprint = graph_fingerprint(forward.graph)
    plan.drop_semantics = drop_semantics(forward.graph)
    fallback = plan.variants["lancet-dw"]
    unpartitioned = VariantPlan(step_fingerprint=plan.fingerprint, predicted=plan.predicted, chosen="none")
    if not options.partition:
        plan.variants["lancet-part"], plan.variants["lancet"] = unpartitioned, fallback
        return
    # disable=None: off unless on a terminal
    bar = tqdm(desc="range search", disable=None if options.progress else True, unit="candidate")
    selection = select_partitions(forward, derived.costs, tokens.shape[0], max_parts=options.max_partitions,
                                  progress=lambda: bar.update(1))
    bar.close()
    plan.selection = selection.to_json()
    if not selection.decisions.regions:
        plan.variants["lancet-part"], plan.variants["lancet"] = unpartitioned, fallback
        return
    partitioned_forward = partition_pass(forward, selection.decisions, tokens.shape[0])
    graph = capture_partitioned_step(step, partitioned_forward, tokens, targets)
    step_fingerprint = graph_fingerprint(graph.graph)
    costs = derived.costs(graph.graph)
    partitioned = simulate(graph.graph, costs)
    order, _ = choose_order(graph, costs, schedule_dw=options.schedule_dw, memory_cap_bytes=options.memory_cap_bytes)
    # Whole steps compared under the same (derived) pricing: the forward-only search may overrate a partition.
    captured_ms, ordered_ms = unpartitioned_ms["captured"], unpartitioned_ms["lancet-dw"]
    plan.selection["whole_step_ms"] = {
        **unpartitioned_ms, "lancet-part": partitioned.makespan_ms, "partition+order": order.timeline.makespan_ms,
    }
    if partitioned.makespan_ms < captured_ms:
        plan.variants["lancet-part"] = VariantPlan(
            partition=selection.decisions, step_fingerprint=step_fingerprint,
            predicted=partitioned.summary(), chosen="partition",
        )
        timelines["lancet-part"] = partitioned
    else:
        plan.variants["lancet-part"] = unpartitioned
    if order.timeline.makespan_ms < ordered_ms:
        plan.variants["lancet"] = VariantPlan(
            partition=selection.decisions, dw=order.dw, allreduce=order.allreduce, step_fingerprint=step_fingerprint,
            predicted=order.timeline.summary(), chosen=f"partition+{order.name}",
        )
        timelines["lancet"] = order.timeline
    else:
        plan.variants["lancet"] = fallback


def print_prediction(result: OptimizeResult, console: Console) -> None:
    plan = result.plan
    table = Table(title="predicted step (simulator)")
    for column in ("variant", "decisions", "step ms", "compute ms", "comm ms", "exposed comm ms", "exposed a2a ms"):
        table.add_column(column, justify="right")
    rows = [("captured", "", plan.predicted)] + [(name, v.chosen, v.predicted) for name, v in plan.variants.items()]
    for name, chosen, p in rows:
        table.add_row(
            name, chosen, f"{p['makespan_ms']:.2f}", f"{p['compute_ms']:.2f}", f"{p['comm_ms']:.2f}",
            f"{p['exposed_comm_ms']:.2f}", f"{p['exposed_a2a_ms']:.2f}",
        )
    console.print(table)
    lancet = plan.variants["lancet"]
    if lancet.partition is not None:
        regions = ", ".join(f"{r.start}..{r.end} x{r.parts}" for r in lancet.partition.regions)
        console.print(f"partitioned ranges: {regions} (drops: {plan.drop_semantics})")
    selection = plan.selection
    if "base_forward_ms" in selection and selection["forward_ms"] >= selection["base_forward_ms"]:
        console.print(f"range search: no range shortens the simulated forward ({selection['base_forward_ms']:.2f} ms)")
    elif "base_forward_ms" in selection:
        line = (f"range search: forward {selection['base_forward_ms']:.2f} -> {selection['forward_ms']:.2f} ms "
                f"with the chosen ranges")
        whole = selection.get("whole_step_ms")
        if whole:
            line += (f"; whole step (estimated pricing) captured {whole['captured']:.2f}, partitioned "
                     f"{whole['lancet-part']:.2f}, lancet-dw {whole['lancet-dw']:.2f}, partitioned + order "
                     f"{whole['partition+order']:.2f} ms")
        console.print(line)
    if result.issue_ms > 0:
        console.print(f"host: issuing the profiled step took {result.issue_ms:.2f} ms; per-node host times "
                      f"scaled by {result.host_scale:.2f} to match")
    executor = plan.options.get("executor", "interpret")
    if executor != "interpret":
        console.print(f"priced for the {executor} executor: compiled regions at their measured compiled/eager "
                      "device-time ratio" + ("; host issue of a graph replay taken as 0" if executor == "cudagraph"
                                             else "; one host call per compiled region"))
    for finding in selection.get("findings", []):
        console.print(f"[yellow]range search: {Finding.from_json(finding).line()}")
    dw = plan.variants["lancet-dw"].dw
    if dw is not None:
        console.print(f"lancet-dw: dW nodes moved into all-to-all windows: {dw.num_moved}")
    if result.unpriced:
        console.print(f"[yellow]nodes without a measured cost (priced 0): {len(result.unpriced)}")


