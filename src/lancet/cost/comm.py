"""Collective cost curves measured on the real process group, and compute/comm contention.

``sweep`` times all-to-all (even splits) and all-reduce over a range of sizes;
``PiecewiseLinear`` interpolates between the points (extrapolating with the end
segments, never below zero). ``measure_contention`` times a matmul loop alone
and while a large all-to-all runs beside it; the ratio is how much slower
compute runs under communication.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lancet.cost.clock import Clock

DEFAULT_SIZES = [2**k for k in range(12, 29)]  # 4 KiB .. 256 MiB
KINDS = ("all_to_all", "all_reduce")


@dataclass(slots=True)
class PiecewiseLinear:
    """ms as a function of bytes through measured (bytes, ms) points."""

    points: list[tuple[float, float]]

    def __post_init__(self) -> None:
        pts = sorted(self.points)
        dedup: list[tuple[float, float]] = []
        for x, y in pts:
            if dedup and abs(x - dedup[-1][0]) < 1e-6:
                continue
            dedup.append((x, y))
        if not dedup:
            raise ValueError("a cost curve needs at least one point")
        self.points = dedup

    def __call__(self, nbytes: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1] * (nbytes / pts[0][0] if pts[0][0] else 1.0)
        xs = [x for x, _ in pts]
        i = min(max(bisect.bisect_left(xs, nbytes), 1), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return max(0.0, y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0))


@dataclass(slots=True)
class CommProfile:
    curves: dict[str, PiecewiseLinear] = field(default_factory=dict)
    contention: float = 1.0
    """Compute slowdown while a collective runs."""
    comm_contention: float = 1.0
    """Collective slowdown while compute runs."""
    issue_ms: float = 0.0
    """Host time to issue one collective (median over the smallest messages)."""
    shared_directions: float | None = None
    """How much sending and receiving share one link: 0 full duplex, 1 one shared path; None: not measured."""

    def ms(self, kind: str, nbytes: float) -> float:
        if kind not in self.curves:
            raise KeyError(f"the comm profile has no curve for {kind}")
        return self.curves[kind](nbytes)

    def all_to_all_ms(self, sent_off: float, received_off: float, world: int) -> float | None:
        """Time of an all-to-all by the bytes one rank sends to and receives from other ranks (None: unknown).

        The curve was measured with even splits of B bytes per rank: B (W-1)/W off-rank each way. An
        uneven all-to-all costs what the even one with the same load on the rank's link costs: the
        larger direction, plus the smaller one as far as the directions share the link.
        """
        if self.shared_directions is None or world < 2:
            return None
        share = self.shared_directions
        load = max(sent_off, received_off) + share * min(sent_off, received_off)
        return self.ms("all_to_all", load * world / ((1.0 + share) * (world - 1)))

    def to_json(self) -> dict:
        return {
            "curves": {k: [[x, y] for x, y in c.points] for k, c in self.curves.items()},
            "contention": self.contention,
            "comm_contention": self.comm_contention,
            "issue_ms": self.issue_ms,
            "shared_directions": self.shared_directions,
        }

    @classmethod
    def from_json(cls, data: dict) -> CommProfile:
        curves = {k: PiecewiseLinear([(float(x), float(y)) for x, y in pts]) for k, pts in data["curves"].items()}
        return cls(
            curves=curves,
            contention=float(data.get("contention", 1.0)),
            comm_contention=float(data.get("comm_contention", 1.0)),
            issue_ms=float(data.get("issue_ms", 0.0)),
            shared_directions=None if data.get("shared_directions") is None else float(data["shared_directions"]),
        )


def _collective(kind: str, nbytes: int, group: dist.ProcessGroup, device: torch.device) -> Callable[[], object]:
    world = dist.get_world_size(group)
    numel = max(world, nbytes // 2 // world * world)  # bf16 elements, divisible by the world size
    send = torch.randn(numel, device=device).to(torch.bfloat16)
    if kind == "all_to_all":
        recv = torch.empty_like(send)
        return lambda: dist.all_to_all_single(recv, send, group=group)
    return lambda: dist.all_reduce(send, group=group)


def measure_issue_ms(group: dist.ProcessGroup, device: torch.device, reps: int = 20) -> float:
    """Host time to issue a small all-to-all (what a collective costs the host that launches it)."""
    call = _collective("all_to_all", 4096, group, device)
    call()
    dist.barrier(group)
    samples = []
    for _ in range(reps):
        begin = time.perf_counter()
        call()
        samples.append((time.perf_counter() - begin) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, statistics.median(samples), group=group)
    return float(statistics.median(gathered))


def sweep(
    group: dist.ProcessGroup,
    device: torch.device,
    sizes: list[int] = DEFAULT_SIZES,
    reps: int = 5,
    progress: Callable[[], None] | None = None,
) -> dict[str, PiecewiseLinear]:
    """Median-of-ranks time of each collective at each size (bytes per rank)."""
    time_ms = Clock(device).device_ms
    curves: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    for kind in KINDS:
        for nbytes in sizes:
            call = _collective(kind, nbytes, group, device)
            call()
            dist.barrier(group)
            local = time_ms(call, reps)
            gathered: list[object] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, local, group=group)
            curves[kind].append((float(nbytes), statistics.median(gathered)))
            if progress is not None:
                progress()
    return {k: PiecewiseLinear(v) for k, v in curves.items()}


def measure_shared_directions(
    group: dist.ProcessGroup, device: torch.device, nbytes: int = 64 * 2**20, reps: int = 5
) -> float | None:
    """How much an all-to-all's two directions share a rank's link, from 0 (full duplex) to 1 (one path).

    Times the even all-to-all of ``nbytes`` per rank against a one-way one with the same off-rank bytes
    per rank: the first half of the ranks only sends (to the second half), the second half only
    receives. Full duplex: the same time; one shared path: half. None for an odd or single-rank world.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2 or world % 2:
        return None
    time_ms = Clock(device).device_ms
    even = _collective("all_to_all", nbytes, group, device)
    offrank = nbytes // 2 * (world - 1) // world  # bf16 elements each rank sends off-rank in the even one
    half = world // 2
    per_peer = offrank // half
    sender = rank < half
    send_splits = [per_peer if (sender and r >= half) else 0 for r in range(world)]
    recv_splits = [per_peer if (not sender and r < half) else 0 for r in range(world)]
    send = torch.zeros(max(sum(send_splits), 1), device=device, dtype=torch.bfloat16)
    recv = torch.empty(max(sum(recv_splits), 1), device=device, dtype=torch.bfloat16)
    send_view, recv_view = send[: sum(send_splits)], recv[: sum(recv_splits)]
    one_way = lambda: dist.all_to_all_single(recv_view, send_view, recv_splits, send_splits, group=group)  # noqa: E731
    samples = []
    for call in (even, one_way):
        call()
        dist.barrier(group)
        samples.append(time_ms(call, reps))
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, samples, group=group)
    even_ms = max(g[0] for g in gathered)
    one_way_ms = max(g[1] for g in gathered)
    return min(max(even_ms / max(one_way_ms, 1e-6) - 1.0, 0.0), 1.0)


def measure_contention(group: dist.ProcessGroup, device: torch.device, reps: int = 3) -> tuple[float, float]:
    """(compute, comm) slowdown when a matmul loop and an all-to-all share the GPU (median of ranks, >= 1).

    Compute: a matmul loop timed alone and while a 256 MiB all-to-all runs
    beside it. Communication: a 64 MiB all-to-all timed alone and while
    matmuls run beside it (NCCL's kernels compete with the GEMMs for SMs).
    """
    if device.type != "cuda":
        return 1.0, 1.0
    time_ms = Clock(device).device_ms
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    matmuls = lambda: [a @ a for _ in range(8)]  # noqa: E731
    matmuls()
    side = torch.cuda.Stream(device)
    big_comm = _collective("all_to_all", 256 * 2**20, group, device)
    comm = _collective("all_to_all", 64 * 2**20, group, device)
    big_comm()
    comm()

    def on_side(fn):
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            return fn()

    def sample(measure, beside) -> float:
        dist.barrier(group)
        torch.cuda.synchronize(device)
        if beside is not None:
            beside()
        elapsed = measure()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        return elapsed

    compute_alone = statistics.median(sample(lambda: time_ms(matmuls, 1), None) for _ in range(reps))
    compute_shared = statistics.median(
        sample(lambda: time_ms(matmuls, 1), lambda: on_side(big_comm)) for _ in range(reps)
    )
    comm_alone = statistics.median(sample(lambda: on_side(lambda: time_ms(comm, 1)), None) for _ in range(reps))
    comm_shared = statistics.median(
        sample(lambda: on_side(lambda: time_ms(comm, 1)), lambda: [a @ a for _ in range(16)]) for _ in range(reps)
    )
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (compute_shared / compute_alone, comm_shared / comm_alone), group=group)
    compute = statistics.median(g[0] for g in gathered)
    comm_factor = statistics.median(g[1] for g in gathered)
    return max(1.0, float(compute)), max(1.0, float(comm_factor))


def measure_comm(
    group: dist.ProcessGroup,
    device: torch.device,
    *,
    sizes: list[int] | None = None,
    reps: int = 5,
    progress: Callable[[], None] | None = None,
    shared_directions: float | None = None,
) -> CommProfile:
    """The comm profile of ``group``: curves, contention both ways, issue time and link sharing.

    ``shared_directions`` given: taken as is instead of measured (a wire whose directions are known).
    """
    curves = sweep(group, device, sizes=sizes or DEFAULT_SIZES, reps=reps, progress=progress)
    compute_slowdown, comm_slowdown = measure_contention(group, device)
    return CommProfile(
        curves=curves,
        contention=compute_slowdown,
        comm_contention=comm_slowdown,
        issue_ms=measure_issue_ms(group, device),
        shared_directions=(measure_shared_directions(group, device) if shared_directions is None
                           else shared_directions),
    )
