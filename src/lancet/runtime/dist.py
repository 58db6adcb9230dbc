"""Process groups, devices, network regimes, and launching local ranks.

Commands run under ``torchrun`` (RANK/WORLD_SIZE in the environment) or launch
``--nproc`` local ranks themselves through torch's elastic launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from lancet.runtime.cudagraph import release_graphs
from lancet.runtime.failures import (
    FAILURE_DIR_ENV,
    INTERRUPTED,
    describe_failure,
    read_failures,
    record_failure,
)

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

DEFAULT_COLLECTIVE_TIMEOUT_S = 300
"""How long a rank waits in one collective before giving up (gloo raises; NCCL's watchdog aborts).

Under lancet's launcher (and torchrun) a rank that dies is noticed within a second by the agent,
which stops the others; this timeout is the bound when the agent cannot tell, e.g. a rank that
hangs, or a rank of another node. It must exceed the longest legitimate wait between ranks
(the slowest rank's capture or checkpoint write before the next collective)."""


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


def init_runtime(timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> Runtime:
    """Initialise the default process group: NCCL with one GPU per rank, else gloo on CPU.

    Every collective of the group gives up after ``timeout_s`` seconds of waiting for a peer.
    """
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
        kwargs: dict[str, Any] = {"backend": "nccl" if use_cuda else "gloo", "timeout": timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    group = dist.group.WORLD
    return Runtime(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group), device=device)


def shutdown_runtime() -> None:
    """Orderly end of a rank that finished its work: wait for the others, then tear the group down.

    CUDA graphs that captured collectives are destroyed first (``release_graphs``): the group's
    teardown would wait for them forever, and the executors that hold them are usually still
    referenced by the rank's job at this point.
    """
    if dist.is_initialized():
        dist.barrier()
        if torch.cuda.is_available() and release_graphs():
            torch.cuda.synchronize()
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
def rank_runtime(
    network: str | None, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S, emulation: EmulationSpec | None = None
) -> Iterator[Runtime]:
    """The body of every rank job: network regime set before NCCL starts, group up, torn down at the end.

    A rank that leaves on an exception does not wait for the others (a barrier there would hang the
    job while another rank waits inside a collective): it records its failure for the launcher
    (before the others can see it and fail in turn), aborts its group and re-raises. With
    ``emulation``, this one process is rank 0 of an emulated job (``lancet.runtime.emulation``).
    """
    if emulation is not None:
        from lancet.runtime.emulation import emulated_runtime

        with emulated_runtime(emulation) as runtime:
            yield runtime
        return
    if network is not None:
        apply_network_env(network)
    runtime = init_runtime(timeout_s)
    try:
        yield runtime
    except BaseException as err:
        record_failure(err, runtime.rank)
        abort_runtime()
        raise
    shutdown_runtime()


class RankFailed(RuntimeError):
    """A rank of a launched job failed; the message names the first rank that did and its error."""

    def __init__(self, message: str, traceback_path: str | None = None) -> None:
        super().__init__(message)
        self.traceback_path = traceback_path
        """A file holding the failed rank's traceback, when it left one."""


class Interrupted(RuntimeError):
    """The job was stopped by a signal (Ctrl-C); every rank has exited."""


def _rank_main(entrypoint: Callable[..., Any], *args: Any) -> Any:
    """Every launched rank runs this: a failure is recorded for the launcher, not printed.

    The rank exits with status 1 (130 when interrupted) at once, without a traceback on the terminal:
    the launcher prints the first failure in one line, and the traceback stays in the record.
    """
    try:
        return entrypoint(*args)
    except BaseException as err:
        if isinstance(err, SystemExit) and not err.code:
            raise
        record_failure(err, int(os.environ.get("RANK", 0)))
        _flush_quietly()
        # Leave at once: the interpreter's orderly shutdown (joining torch's threads) takes seconds, during which
        # the other ranks wait in a collective for this one.
        os._exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def _flush_quietly() -> None:
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _interrupted(folder: str) -> Interrupted:
    """What the ranks said when they stopped on Ctrl-C (rank 0's words), as one exception."""
    said = sorted((r.rank, r.line) for r in read_failures(folder) if r.kind == INTERRUPTED)
    return Interrupted(said[0][1] if said else "interrupted; every rank has stopped")


def _failure(err: ChildFailedError, folder: str) -> RankFailed | Interrupted:
    records = read_failures(folder)
    exitcodes = {rank: failure.exitcode for rank, failure in err.failures.items()}
    if records and all(r.kind == INTERRUPTED for r in records):
        return _interrupted(folder)
    line = describe_failure(records, exitcodes)
    rank = next((r for r in records if line == f"rank {r.rank} failed: {r.line}"), None)
    return RankFailed(line, str(Path(folder) / f"rank{rank.rank}.json") if rank is not None else None)


def launch(entrypoint: Callable[..., Any], args: tuple, nproc: int | None) -> Any:
    """Run ``entrypoint(*args)`` on every rank: in place under torchrun, else on ``nproc`` local ranks.

    Returns rank 0's return value. When a rank fails, the launcher stops every other rank (SIGTERM,
    then SIGKILL after 30 s) and raises ``RankFailed`` naming the first rank that failed and its
    error. On Ctrl-C (SIGINT, SIGTERM) it passes the signal to the ranks, waits for them (up to
    30 s, then SIGKILL) and raises ``Interrupted``. No rank outlives the call.
    """
    if under_torchrun():
        return entrypoint(*args)
    from torch.distributed.elastic.multiprocessing.api import SignalException
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
    folder = tempfile.mkdtemp(prefix=f"{config.run_id}-")
    keep = False
    with _quiet_elastic_logs(), _environment(FAILURE_DIR_ENV, folder):
        try:
            results = elastic_launch(config, _rank_main)(entrypoint, *args)
        except ChildFailedError as err:
            failure = _failure(err, folder)
            keep = isinstance(failure, RankFailed) and failure.traceback_path is not None
            raise failure from None
        except (SignalException, KeyboardInterrupt):
            raise _interrupted(folder) from None
        finally:
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
    return results[0]


@contextlib.contextmanager
def _environment(key: str, value: str) -> Iterator[None]:
    """``key=value`` in the environment the ranks inherit, for the duration of the launch."""
    previous = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


@contextlib.contextmanager
def _quiet_elastic_logs() -> Iterator[None]:
    """The elastic agent (and the process spawner under it) log every failure and shutdown; lancet reports the
    first failure itself. Their loggers set levels of their own, so each is quieted, not just the parents."""
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    names = [name for name in list(logging.root.manager.loggerDict) if name.startswith(prefixes)]
    loggers = [logging.getLogger(name) for name in (*prefixes, *names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
