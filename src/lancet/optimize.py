"""``lancet optimize``: from a compute profile and a comm profile to a plan, in one process.

The step graph is captured again on this machine with a fake process group of
the profile's world size (no communication happens while tracing), checked to
be the graph that was profiled, and handed to the passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from lancet.artifact import ArtifactMismatch, identity_from_json, read_artifact
from lancet.capture import TrainGraph, capture_step
from lancet.config import ModelSpec
from lancet.cost.comm import CommProfile
from lancet.cost.model import ProfiledCostModel
from lancet.cost.profile import ComputeProfile, graph_fingerprint
from lancet.data import BatchSource
from lancet.models import build_model
from lancet.plan import Plan, make_plan
from lancet.step import TrainStep
from lancet.train import AUTOCAST


@dataclass(slots=True)
class OptimizeResult:
    plan: Plan
    unpriced: list[str]


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


def capture_for_profile(document: dict) -> TrainGraph:
    """Capture the step graph the profile was made from (rank 0's view), with a fake group."""
    identity = identity_from_json(document["identity"])
    spec = ModelSpec(**document["spec"])
    cfg = spec.model_config()
    device = torch.device("cuda", 0) if identity.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactMismatch(f"the profile was made on {identity.device}; optimize it on a machine with that GPU")
    group = dist.group.WORLD
    model = build_model(cfg, group, device=device)
    step = TrainStep(model, group, autocast_dtype=AUTOCAST[identity.dtype])
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    tokens, targets = (t.to(device) for t in source.batch(0, 0))
    return capture_step(step, tokens, targets)


def optimize(
    profile_path: str,
    comm_path: str,
    *,
    schedule_dw: bool = True,
    memory_cap_bytes: int | None = None,
    trace_dir: str | None = None,
) -> OptimizeResult:
    profile_doc = read_artifact(profile_path, "profile")
    comm_doc = read_artifact(comm_path, "comm")
    profile_identity = identity_from_json(profile_doc["identity"])
    comm_identity = identity_from_json(comm_doc["identity"])
    differences = [
        f"{f}: comm has {getattr(comm_identity, f)!r}, profile has {getattr(profile_identity, f)!r}"
        for f in ("world_size", "device", "torch_version")
        if getattr(comm_identity, f) != getattr(profile_identity, f)
    ]
    if differences:
        raise ArtifactMismatch(f"{comm_path} was measured for a different run:\n  " + "\n  ".join(differences))
    profile = ComputeProfile.from_json(profile_doc["profile"])
    cost_model = ProfiledCostModel(
        profile=profile,
        comm=CommProfile.from_json(comm_doc["comm"]),
        model_host=profile_identity.device.startswith("cuda"),
    )
    with fake_process_group(profile_identity.world_size):
        train_graph = capture_for_profile(profile_doc)
        fingerprint = graph_fingerprint(train_graph.graph)
        if fingerprint != profile.fingerprint:
            raise ArtifactMismatch(
                f"the graph captured here ({fingerprint}) is not the profiled graph ({profile.fingerprint}); "
                "optimize with the same lancet and torch on the same kind of device"
            )
        costs = cost_model.costs(train_graph.graph)
        identity = replace(profile_identity, network=comm_identity.network)
        plan, before, after = make_plan(
            train_graph, costs, identity, schedule_dw=schedule_dw, memory_cap_bytes=memory_cap_bytes
        )
    if trace_dir is not None:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        before.write_chrome_trace(str(Path(trace_dir) / "predicted_captured.json"))
        after.write_chrome_trace(str(Path(trace_dir) / "predicted_plan.json"))
    return OptimizeResult(plan=plan, unpriced=list(cost_model.unpriced))


def print_prediction(result: OptimizeResult, console: Console) -> None:
    table = Table(title="predicted step (simulator)")
    for column in ("order", "step ms", "compute ms", "comm ms", "exposed comm ms", "exposed a2a ms", "peak live MB"):
        table.add_column(column, justify="right")
    for label, key in (("captured", "before"), ("plan", "after")):
        p = result.plan.predicted[key]
        table.add_row(
            label,
            f"{p['makespan_ms']:.2f}",
            f"{p['compute_ms']:.2f}",
            f"{p['comm_ms']:.2f}",
            f"{p['exposed_comm_ms']:.2f}",
            f"{p['exposed_a2a_ms']:.2f}",
            f"{p['peak_live_bytes'] / 1e6:.1f}",
        )
    console.print(table)
    chosen = result.plan.options.get("chosen")
    candidates = result.plan.predicted.get("candidates", {})
    console.print(
        "candidates (predicted step ms): "
        + ", ".join(f"{name} {p['makespan_ms']:.2f}" for name, p in candidates.items())
        + f"; chosen: {chosen}"
    )
    if result.plan.dw is not None:
        console.print(f"dW nodes moved into all-to-all windows: {result.plan.dw.num_moved}")
    if result.plan.allreduce is not None:
        placed = sum(len(v) for v in result.plan.allreduce.after.values())
        console.print(f"all-reduce buckets issued between all-to-alls: {placed}")
    if result.unpriced:
        console.print(f"[yellow]nodes without a measured cost (priced 0): {len(result.unpriced)}")
