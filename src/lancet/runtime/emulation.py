"""One rank of a W-rank expert-parallel job on one device, with only the network modelled.

Per rank, the compute of an expert-parallel step does not depend on W (the rank's local experts
receive T rows in total); only the wire does. ``emulated_runtime`` builds rank 0 of a W-rank job
in this one process: a ``lancet_emulated`` process group of W ranks whose collectives are
stand-ins (``lancet.runtime.standin``: mirrored local results, the regime's time on a
communication lane). Models, steps, captures, passes, plans and executors run on it unchanged.

What an emulated run computes (the exact contract): rank 0 of a job whose every peer mirrors
rank 0. Its loss is the loss one process computes on rank 0's batch with all E = W * L experts,
expert e carrying the weights of rank 0's local expert e mod L (same routing, capacity and
dropped tokens). Dense gradients equal that process's gradient of the loss (the gradient
all-reduce sums W copies of ``grad(loss / W)``); the gradient of rank 0's local expert l is 1/W
of the sum of that process's gradients of experts l, L + l, 2L + l, .... It is also exactly rank
0 of a real W-rank run in which every rank holds rank 0's batch, rank 0's local experts and dense
weights, and rank r's router rows are rank 0's rotated by r * L (so rank r sends rank 0 what rank
0 sends rank r) -- except for the router's gradient, which that real run sums over rotated copies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lancet.cost.wire import Wire
from lancet.runtime.cudagraph import release_graphs
from lancet.runtime.dist import Runtime
from lancet.runtime.regimes import Regime, load_regime
from lancet.runtime.standin import CpuLane, StandIns

DEFAULT_SMS = 4
"""Programs (SMs) a GPU stand-in keeps resident for a whole transfer, as NCCL's channel blocks are, when
neither ``--emulate-sms`` nor the regime (``standin_sms``: 1 for ib100, 2 for ib400) says."""

EMULATED_SHARED_DIRECTIONS = 0.0
"""What ``lancet profile-comm`` records for an emulated wire's link-direction sharing: the stand-in prices
the bytes a rank sends off-rank, which in an emulated run always equal the bytes it receives, so an
even all-to-all and any other one with the same off-rank bytes cost the same (full duplex)."""


@dataclass(frozen=True, slots=True)
class EmulationSpec:
    """Which job an emulated run is rank 0 of: its world size, the regime pricing its wire, the stand-in's SMs."""

    world_size: int
    regime: Regime
    sms: int = DEFAULT_SMS

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"--emulate needs a world of at least 2 ranks, got {self.world_size}")
        if self.sms < 1:
            raise ValueError(f"--emulate-sms must be >= 1, got {self.sms}")

    @classmethod
    def parse(cls, text: str, sms: int | None = None) -> EmulationSpec:
        """``W:REGIME``: W ranks, REGIME a shipped regime name or a ``lancet profile-comm`` JSON file.

        ``sms`` None: the regime's SM count where it records one, else ``DEFAULT_SMS``.
        """
        world, sep, name = text.partition(":")
        if not sep or not world.strip().isdigit() or not name:
            raise ValueError(f"--emulate takes W:REGIME (e.g. 8:ib100 or 4:comm.json), got {text!r}")
        regime = load_regime(name)
        if sms is None:
            sms = regime.sms if regime.sms is not None else DEFAULT_SMS
        return cls(world_size=int(world), regime=regime, sms=sms)

    @property
    def label(self) -> str:
        return f"{self.world_size}:{self.regime.name}"

    @property
    def network(self) -> str:
        """The network field of the run's identity: artifacts of emulated and real runs never mix."""
        return f"emulated:{self.regime.name}"

    def record(self) -> dict:
        """What bench JSON says about an emulated row."""
        return {"world_size": self.world_size, "regime": self.regime.name, "regime_file": self.regime.path,
                "regime_source": self.regime.source, "measured_world": self.regime.measured_world,
                "sms": self.sms, "contract": "rank 0 of a job whose every peer mirrors rank 0"}


def _lanes(device: torch.device, sms: int) -> dict:
    """Host tensors (timing metadata, CPU runs) on a host lane; GPU tensors on a communication stream."""
    if device.type != "cuda":
        return {"cpu": CpuLane()}
    from lancet.runtime.standin_cuda import CudaLane

    return {"cpu": CpuLane(), "cuda": CudaLane(device, sms)}


@contextlib.contextmanager
def emulated_runtime(spec: EmulationSpec) -> Iterator[Runtime]:
    """Rank 0 of a ``spec.world_size``-rank job in this process; every collective a stand-in.

    Uses the local GPU when there is one (``LOCAL_RANK``, default 0), else the CPU. The
    functional collectives' kernels are replaced for the process until the context ends.
    """
    from lancet.runtime.emulated_group import BACKEND, install_functional, register_backend

    if dist.is_initialized():
        raise RuntimeError("an emulated run needs a process without an initialised process group")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    regime = spec.regime
    stand_ins = StandIns(Wire(regime.comm, regime.measured_world, spec.world_size), _lanes(device, spec.sms))
    register_backend()
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=spec.world_size,
                            pg_options=stand_ins)
    group = dist.group.WORLD
    library = install_functional(stand_ins, group.group_name)
    try:
        yield Runtime(group=group, rank=0, world_size=spec.world_size, device=device)
        release_graphs()  # an orderly end, as lancet.runtime.dist.shutdown_runtime's
    finally:
        library._destroy()
        dist.destroy_process_group()
