"""Split sizes to the host without stalling the stream.

``to_host`` starts an asynchronous device-to-host copy into pinned memory and
records an event; ``host_wait`` blocks the host on that event only. In a graph
the two are separate nodes, so the copy can be issued as soon as the counts
exist and the wait placed as late as the schedule allows, while the device
keeps executing what was issued before it.

On the CPU both are plain copies. ``blocked_seconds`` totals the time hosts spent
blocked in ``host_wait`` (the profile separates issue time from waiting with it).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

_pending: dict[int, torch.cuda.Event] = {}
_MAX_PENDING = 1024
"""Copies never waited for (a profiler re-running ``to_host``) are forgotten beyond this many."""
_blocked = [0.0]
"""Seconds spent blocked in ``host_wait`` (one cell, so the op can add to it)."""


@torch.library.custom_op("lancet::to_host", mutates_args=())
def to_host(x: Tensor) -> Tensor:
    """Asynchronous copy of ``x`` to (pinned) host memory; read it only after ``host_wait``."""
    if x.device.type != "cuda":
        return x.clone()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x.device))
    if len(_pending) >= _MAX_PENDING:
        _pending.pop(next(iter(_pending)))
    _pending[out.data_ptr()] = event
    return out


@to_host.register_fake
def _to_host_fake(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("lancet::host_wait", mutates_args=())
def host_wait(x: Tensor) -> Tensor:
    """Block the host until the copy that produced ``x`` has landed; returns the values."""
    event = _pending.pop(x.data_ptr(), None)
    if event is not None:
        begin = time.perf_counter()
        event.synchronize()
        _blocked[0] += time.perf_counter() - begin
    return x.clone()


def blocked_seconds() -> float:
    """Total seconds this process has spent blocked in ``host_wait`` so far."""
    return _blocked[0]


@host_wait.register_fake
def _host_wait_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)
