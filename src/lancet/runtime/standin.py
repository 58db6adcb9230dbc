"""Stand-in collectives of an emulated rank: the local result of a mirrored world, the wire's time on a lane.

An emulated run is rank 0 of a W-rank job, run alone. Its collectives cannot see other ranks'
data, so they return what they would return if **every peer mirrored rank 0** (the contract):

- all-to-all: peer r sends rank 0 exactly what rank 0 sends peer r. The output is the input,
  block for block (received rows are the sent rows re-labelled); output and input split sizes
  must agree. The counts exchange of the ragged dispatch therefore gives every expert of rank 0
  the rows rank 0 routed to the experts with the same local index on every rank.
- all-reduce: every rank contributes rank 0's value: ``sum`` gives W x the value; ``avg``,
  ``max`` and ``min`` give the value.
- all-gather: W copies of the value; broadcast and barrier change nothing.

Each all-to-all and all-reduce holds a communication lane for the time the wire (``Wire``)
gives for the bytes crossing the rank's link; the lane runs one transfer at a time, in issue
order, as a communication stream does. Lanes: ``CpuLane`` here (a deadline the wait sleeps
until) for host tensors, and ``lancet.runtime.standin_cuda.CudaLane`` (a copy-then-hold kernel on
a communication stream) for GPU tensors; a collective runs on the lane of its tensor's device.

Functional collectives (the ones in captured graphs) start at the collective and end at
``wait``, so compute issued between them overlaps the transfer. ``*_now`` variants (the c10d
calls ``dist.all_reduce`` etc.) join the lane at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from lancet.cost.wire import Wire

ALL_TO_ALL, ALL_REDUCE = "all_to_all", "all_reduce"
MIRRORED_REDUCTIONS = ("sum", "avg", "max", "min")


class Lane(Protocol):
    """Where a stand-in's transfer runs: one at a time, in issue order."""

    def transfer(self, src: Tensor, dst: Tensor, hold_ms: float, kind: str, scale: int | None) -> object:
        """Write ``src`` (times ``scale`` when given) into ``dst`` and hold the lane ``hold_ms``; returns a ticket."""
        ...

    def join(self, ticket: object) -> None:
        """Make the caller (host or current stream) wait until the ticket's transfer is over."""
        ...


class CpuLane:
    """The lane on the host: a transfer ends ``hold_ms`` after the later of its issue and the previous end.

    The copy itself happens at issue; ``join`` sleeps until the end, so compute done between
    issue and join overlaps the transfer.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep):
        self._clock = clock
        self._sleep = sleep
        self._free_at = 0.0

    def transfer(self, src: Tensor, dst: Tensor, hold_ms: float, kind: str, scale: int | None) -> float:
        if scale is not None and scale != 1:
            torch.mul(src, scale, out=dst)
        elif dst is not src:
            dst.copy_(src)
        begin = max(self._clock(), self._free_at)
        self._free_at = begin + hold_ms / 1e3
        return self._free_at

    def join(self, ticket: object) -> None:
        left = float(ticket) - self._clock()
        if left > 0:
            self._sleep(left)


def _equal_splits(rows: int, world: int) -> list[int]:
    if rows % world:
        raise ValueError(f"an all-to-all without split sizes needs rows divisible by {world} ranks, got {rows}")
    return [rows // world] * world


def mirrored_splits(rows: int, out_splits: Sequence[int] | None, in_splits: Sequence[int] | None,
                    world: int) -> list[int]:
    """The split sizes of an all-to-all in the mirrored world (received = sent); ValueError when they disagree."""
    sent = [int(s) for s in in_splits] if in_splits else _equal_splits(rows, world)
    received = [int(s) for s in out_splits] if out_splits else _equal_splits(rows, world)
    if len(sent) != world or sum(sent) != rows:
        raise ValueError(f"all-to-all input splits {sent} do not cover {rows} rows in {world} blocks")
    if received != sent:
        raise ValueError(
            f"emulated all-to-all: output splits {received} differ from input splits {sent}; in an emulated run "
            "every peer mirrors rank 0 and sends it exactly what it sends them"
        )
    return sent


class StandIns:
    """The collectives of rank 0 of a ``wire.world``-rank job, run alone (see the module contract).

    ``lanes`` maps a device type (``cpu``, ``cuda``) to the lane of that device's tensors.
    """

    def __init__(self, wire: Wire, lanes: dict[str, Lane]) -> None:
        self.wire = wire
        self.lanes = lanes
        self.world = wire.world
        self._pending: dict[int, tuple[Tensor, Lane, object]] = {}

    def _lane(self, tensor: Tensor) -> Lane:
        lane = self.lanes.get(tensor.device.type)
        if lane is None:
            raise ValueError(f"no stand-in lane for {tensor.device.type} tensors in this emulated run")
        return lane

    # ----------------------------------------------------------------- functional: start now, end at wait

    def all_to_all(self, inp: Tensor, out_splits: Sequence[int] | None, in_splits: Sequence[int] | None) -> Tensor:
        """Start an all-to-all of ``inp``; returns its output (the input's rows), complete after ``wait``."""
        out = torch.empty_like(inp, memory_format=torch.contiguous_format)
        self._pending[id(out)] = (out, self._lane(out), self._all_to_all(out, inp, out_splits, in_splits))
        return out

    def all_reduce(self, inp: Tensor, op: str, inplace: bool = False) -> Tensor:
        """Start an all-reduce of ``inp`` (in place when asked); returns its output, complete after ``wait``."""
        out = inp if inplace else torch.empty_like(inp, memory_format=torch.contiguous_format)
        self._pending[id(out)] = (out, self._lane(out), self._all_reduce(out, inp, op))
        return out

    def wait(self, tensor: Tensor) -> Tensor:
        """End the collective that produced ``tensor`` (nothing for a tensor no pending collective made)."""
        entry = self._pending.pop(id(tensor), None)
        if entry is not None:
            _, lane, ticket = entry
            lane.join(ticket)
        return tensor

    # ----------------------------------------------------------------- c10d: start and end now

    def all_to_all_now(self, out: Tensor, inp: Tensor, out_splits: Sequence[int] | None,
                       in_splits: Sequence[int] | None) -> None:
        if out.shape != inp.shape:
            raise ValueError(f"emulated all-to-all: output shape {tuple(out.shape)} differs from input "
                             f"{tuple(inp.shape)} (every peer mirrors rank 0)")
        self._lane(out).join(self._all_to_all(out, inp, out_splits, in_splits))

    def all_reduce_now(self, tensor: Tensor, op: str) -> None:
        self._lane(tensor).join(self._all_reduce(tensor, tensor, op))

    # ----------------------------------------------------------------- pricing

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits, in_splits) -> object:
        rows = inp.shape[0] if inp.dim() else 1
        splits = mirrored_splits(rows, out_splits, in_splits, self.world)
        nbytes = inp.numel() * inp.element_size()
        offrank = nbytes - (nbytes * splits[0] // rows if rows else 0)
        return self._lane(out).transfer(inp.contiguous(), out, self.wire.all_to_all_ms(offrank), ALL_TO_ALL, None)

    def _all_reduce(self, out: Tensor, inp: Tensor, op: str) -> object:
        if op not in MIRRORED_REDUCTIONS:
            raise ValueError(f"emulated all-reduce: {op!r} is not defined when every rank holds rank 0's value; "
                             f"use one of {', '.join(MIRRORED_REDUCTIONS)}")
        hold_ms = self.wire.all_reduce_ms(inp.numel() * inp.element_size())
        scale = self.world if op == "sum" else None
        return self._lane(out).transfer(inp, out, hold_ms, ALL_REDUCE, scale)
