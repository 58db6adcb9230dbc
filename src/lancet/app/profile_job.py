"""Rank-side jobs of ``lancet profile`` and ``lancet profile-comm``."""

from __future__ import annotations

from dataclasses import asdict, replace

from rich.console import Console

from lancet.plan.artifact import write_artifact
from lancet.capture.trace import capture_step
from lancet.app.config import RunConfig
from lancet.cost.comm import DEFAULT_SIZES, KINDS, measure_comm
from lancet.cost.profile import profile_graph
from lancet.app.report import StepProgress, console_for
from lancet.runtime.dist import rank_runtime
from lancet.runtime.emulation import EMULATED_SHARED_DIRECTIONS


def profile_worker(run: RunConfig, out_path: str, passes: int, reps: int, tutel_parts: int = 1,
                   executor: str | None = None) -> dict:
    """Capture the step (or its ``tutel-d<tutel_parts>`` rewrite), time every compute node over ``passes`` batches,
    and every compiled region under ``executor`` (None: the default for the graph and device); write the agreed
    profile (rank 0)."""
    from lancet.plan.plan import tutel_graph
    from lancet.app.train import build_session

    with rank_runtime(run.network, run.collective_timeout, run.emulation()) as runtime:
        session = build_session(run, runtime)
        tokens, targets = session.batch(0)
        if tutel_parts == 1:
            train_graph = capture_step(session.train_step, tokens, targets)
        else:
            train_graph = tutel_graph(session.train_step, tokens, targets, tutel_parts)
        batches = [[*session.params, *session.batch(step)] for step in range(passes)]
        with StepProgress(console_for(runtime.is_main), "profile passes", passes) as bar:
            profile = profile_graph(train_graph.gm, batches, runtime.device, runtime.group, reps=reps,
                                    progress=lambda i: bar.advance(f"profile pass {i}/{passes} done"))
        profile.executor = _profile_executor(train_graph, executor, batches, session, profile.node_ms, reps)
        profile.optimizer_ms = optimizer_ms(session, reps)
        payload = {"spec": asdict(run.spec), "profile": profile.to_json(), "tutel_parts": tutel_parts}
        if runtime.is_main:
            write_artifact(out_path, "profile", run.identity(runtime.world_size, runtime.device), payload)
            total = sum(profile.node_ms.values())
            Console().print(
                f"profiled {len(profile.node_ms)} compute nodes ({len(profile.op_ms())} distinct ops), "
                f"sum {total:.2f} ms per step, optimizer {profile.optimizer_ms:.2f} ms -> {out_path}"
            )
            if profile.executor is not None:
                totals = profile.executor.summary()
                Console().print(
                    f"{profile.executor.kind}: {totals['regions']} compiled regions, {totals['eager_ms']:.2f} ms eager "
                    f"-> {totals['compiled_ms']:.2f} ms compiled (device); host {totals['host_ms']:.2f} ms in region "
                    f"calls, {totals['issue_ms']:.2f} ms to issue a step", markup=False)
        return payload


def _profile_executor(train_graph, executor: str | None, batches, session, node_ms: dict, reps: int):
    """Region timings under ``executor`` (None when it resolves to interpret)."""
    from lancet.app.compile_progress import compile_progress
    from lancet.runtime.region_timing import profile_executor

    runtime = session.runtime
    return profile_executor(train_graph, executor, batches, runtime.device, runtime.group, node_ms, reps=reps,
                            progress=compile_progress(runtime.is_main))


def optimizer_ms(session, reps: int) -> float:
    """Time of one optimizer update after the step (gradients handed over, step, zero_grad), slowest rank.

    The longer of the device time and the host's issue time; measured on zero gradients of the real shapes.
    """
    import torch
    import torch.distributed as dist

    from lancet.cost.clock import Clock
    from lancet.step.train_step import StepResult

    grads = [torch.zeros_like(p) for p in session.params]
    update = lambda: session.apply(StepResult(torch.zeros(()), grads, []))  # noqa: E731
    clock = Clock(session.runtime.device)
    update()
    device_ms, host_ms = clock.time_ms(update, reps)
    slowest = torch.tensor([max(device_ms, host_ms)], dtype=torch.float64, device=session.runtime.device)
    if session.runtime.group is not None and dist.get_world_size(session.runtime.group) > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=session.runtime.group)
    return float(slowest.item())


def profile_comm_worker(run: RunConfig, out_path: str, sizes: list[int], reps: int) -> dict:
    """Sweep collective sizes and measure contention on the real group; write the comm profile (rank 0)."""
    with rank_runtime(run.network, run.collective_timeout, run.emulation()) as runtime:
        with StepProgress(console_for(runtime.is_main), "comm sweep", len(sizes) * len(KINDS)) as bar:
            # one-way traffic does not exist where every peer mirrors rank 0; the emulated wire is full duplex
            comm = measure_comm(runtime.group, runtime.device, sizes=sizes, reps=reps, progress=lambda: bar.advance(),
                                shared_directions=None if run.emulate is None else EMULATED_SHARED_DIRECTIONS)
        payload = {"comm": comm.to_json()}
        if runtime.is_main:
            identity = replace(run.identity(runtime.world_size, runtime.device), model="", gate="", dtype="")
            write_artifact(out_path, "comm", identity, payload)
            largest, ms = comm.curves["all_to_all"].points[-1]
            Console().print(
                f"all-to-all of {largest / 2**20:.1f} MiB: {ms:.3f} ms; compute slowdown under comm "
                f"x{comm.contention:.3f}, comm slowdown under compute x{comm.comm_contention:.3f}, directions share "
                f"the link {comm.shared_directions if comm.shared_directions is None else round(comm.shared_directions, 2)}"
                f" -> {out_path}"
            )
        return payload


def step_for_profile(document: dict):
    """The step (rank 0's view, on the current process group) and a batch for the run a profile was made for."""
    import torch
    import torch.distributed as dist

    from lancet.app.config import ModelSpec, build_run_model
    from lancet.app.data import BatchSource
    from lancet.app.train import AUTOCAST, factory_step
    from lancet.models.factory import is_factory_reference
    from lancet.plan.artifact import ArtifactMismatch, identity_from_json
    from lancet.step.train_step import TrainStep

    identity = identity_from_json(document["identity"])
    spec = ModelSpec(**document["spec"])
    device = torch.device("cuda", 0) if identity.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactMismatch(f"the profile was made on {identity.device}; optimize it on a machine with that GPU")
    group = dist.group.WORLD
    if is_factory_reference(spec.model):  # rank 0's first batch; planning never updates the parameters
        _, _, train_step, tokens, targets = factory_step(spec.model, group, device, 0, AUTOCAST[identity.dtype],
                                                         lambda params: torch.optim.SGD(params, lr=0.0))
        return train_step, tokens, targets
    cfg = spec.model_config()
    step = TrainStep(build_run_model(cfg, group, device), group, autocast_dtype=AUTOCAST[identity.dtype])
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    tokens, targets = (t.to(device) for t in source.batch(0, 0))
    return step, tokens, targets


__all__ = ["DEFAULT_SIZES", "profile_comm_worker", "profile_worker", "step_for_profile"]
