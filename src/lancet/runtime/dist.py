"""Process groups, devices, network regimes, and launching local ranks.

Commands run under ``torchrun`` (RANK/WORLD_SIZE in the environment) or launch
``--nproc`` local ranks themselves through torch's elastic launcher.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

if TYPE_CHECKING:
    from lancet.runtime.emulation import EmulationSpec

NETWORK_ENV: dict[str, dict[str, str]] = {
    "nvlink": {},
    "ib400": {"NCCL_MAX_NCHANNELS": "2"},
    "ib100": {"NCCL_P2P_DISABLE": "1", "NCCL_MAX_NCHANNELS": "1"},
    "eth": {
        "NCCL_P2P_DISABLE": "1",
        "NCCL_SHM_DISABLE": "1",
        "NCCL_IB_DISABLE": "1",
        "NCCL_SOCKET_IFNAME": "lo",
    },
}
"""NCCL settings that make one NVLink host behave like slower interconnects."""

SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast stays off: lancet never needs it."""


def apply_network_env(network: str) -> None:
    """Set the NCCL environment of a regime; must run before the first NCCL communicator exists."""
    if network not in NETWORK_ENV:
        raise ValueError(f"unknown network regime {network!r}; choose one of {', '.join(NETWORK_ENV)}")
    for key, value in {**SAFE_NCCL_ENV, **NETWORK_ENV[network]}.items():
        os.environ[key] = value


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_nproc() -> int:
    """All local GPUs, or 2 CPU ranks when there is no GPU."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def planned_world_size(nproc: int | None) -> int:
    """World size the command will run with, known before any rank starts."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return nproc if nproc is not None else default_nproc()


@dataclass(slots=True)
class Runtime:
    """What a rank needs to know about where it runs."""

    group: dist.ProcessGroup
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def init_runtime() -> Runtime:
    """Initialise the default process group: NCCL with one GPU per rank, else gloo on CPU."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": "nccl" if use_cuda else "gloo"}
        if use_cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    group = dist.group.WORLD
    return Runtime(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group), device=device)


def shutdown_runtime() -> None:
    """Orderly end of a rank that finished its work: wait for the others, then tear the group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_runtime() -> None:
    """End of a rank leaving on an error: no collective (the other ranks may never reach it), no wait.

    NCCL communicators are aborted so that pending work cannot block the process's exit; the
    launcher then sees this rank fail and stops the others.
    """
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()
        else:
            dist.destroy_process_group()
    except Exception:  # the rank is failing already; its own error is the one to report
        pass


@contextlib.contextmanager
def rank_runtime(network: str | None, emulation: EmulationSpec | None = None) -> Iterator[Runtime]:
    """The body of every rank job: network regime set before NCCL starts, group up, torn down at the end.

    A rank that leaves on an exception does not wait for the others (a barrier there would hang the
    job while another rank waits inside a collective): it aborts its group and re-raises. With
    ``emulation``, this one process is rank 0 of an emulated job (``lancet.runtime.emulation``).
    """
    if emulation is not None:
        from lancet.runtime.emulation import emulated_runtime

        with emulated_runtime(emulation) as runtime:
            yield runtime
        return
    if network is not None:
        apply_network_env(network)
    runtime = init_runtime()
    try:
        yield runtime
    except BaseException:
        abort_runtime()
        raise
    shutdown_runtime()


class RankFailed(RuntimeError):
    """A rank of a launched job failed; the message names the first rank that did and its error."""


@record
def _rank_main(entrypoint: Callable[..., Any], *args: Any) -> Any:
    """Every launched rank runs this: its error is recorded for the launcher to report."""
    return entrypoint(*args)


def _first_failure(err: ChildFailedError) -> str:
    rank, failure = min(err.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    if not message or message.startswith("To enable traceback"):
        message = f"exit code {failure.exitcode}"
    return f"rank {rank} failed: {str(message).strip().splitlines()[-1] if message else ''}"


def launch(entrypoint: Callable[..., Any], args: tuple, nproc: int | None) -> Any:
    """Run ``entrypoint(*args)`` on every rank: in place under torchrun, else on ``nproc`` local ranks.

    Returns rank 0's return value. When a rank fails, the launcher stops every other rank and
    raises ``RankFailed`` naming the first rank that failed and its error.
    """
    if under_torchrun():
        return entrypoint(*args)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = nproc if nproc is not None else default_nproc()
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"lancet-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, _rank_main)(entrypoint, *args)
    except ChildFailedError as err:
        raise RankFailed(_first_failure(err)) from None
    return results[0]
