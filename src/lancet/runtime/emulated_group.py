"""The process group of an emulated rank, and the functional collectives' kernels that run its stand-ins.

Two doors lead to collectives, and both go to the same ``StandIns``:

- c10d calls (``dist.all_reduce``, ``dist.all_gather_object``, ``dist.barrier``, ``dist.all_to_all_single``)
  reach ``EmulatedProcessGroup``, a Python process group registered as the ``lancet_emulated``
  backend. It returns the mirrored results (see ``lancet.runtime.standin``) and joins the lane at
  once, as a blocking call does. All-gather, broadcast and barrier carry host metadata only in
  lancet and take no wire time. Other collectives (reduce-scatter, gather, scatter, point-to-point)
  are not emulated: torch raises for them.
- Functional collectives (``_c10d_functional.all_to_all_single``, ``all_reduce``, ``all_reduce_``,
  their coalesced forms, ``wait_tensor``; what captured graphs, autograd's all-to-all and Inductor's
  code call) get CPU and CUDA kernels that start the stand-in and end it at ``wait_tensor``. The
  traced graph keeps ordinary ``_c10d_functional`` nodes, so passes, plans and executors see no
  difference. The kernels are replaced for the process while an emulation is installed and
  restored when it ends; a collective on any other group is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.futures import Future

from lancet.runtime.standin import StandIns

BACKEND = "lancet_emulated"

_REDUCE_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.MIN: "min",
}


def _done(result) -> dist.Work:
    from torch._C._distributed_c10d import _create_work_from_future

    future: Future = Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _reduce_op_name(op) -> str:
    for known, name in _REDUCE_OPS.items():
        if op == known:
            return name
    raise ValueError(f"emulated all-reduce: {op} is not defined when every rank holds rank 0's value; use sum, avg, "
                     "max or min")


class EmulatedProcessGroup(dist.ProcessGroup):
    """c10d collectives of rank 0 of a W-rank job run alone: mirrored results, wire time on the lane."""

    def __init__(self, rank: int, world_size: int, stand_ins: StandIns) -> None:
        super().__init__(rank, world_size)
        self.stand_ins = stand_ins

    @property
    def group_name(self) -> str:
        return dist.distributed_c10d._world.pg_names[self]

    def getBackendName(self) -> str:  # noqa: N802 (c10d's name)
        return BACKEND

    def allreduce(self, tensors, opts=None):
        op = _reduce_op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        for tensor in tensors:
            self.stand_ins.all_reduce_now(tensor, op)
        return _done(tensors)

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):  # noqa: A002
        self.stand_ins.all_to_all_now(output, input, output_split_sizes, input_split_sizes)
        return _done([output])

    def allgather(self, output_tensors, input_tensors, opts=None):
        for outputs, value in zip(output_tensors, input_tensors):
            for out in outputs:
                out.copy_(value)
        return _done(output_tensors)

    def all_gather_single(self, output, input, opts=None):  # noqa: A002
        output.view(self.size(), *input.shape).copy_(input.unsqueeze(0).expand(self.size(), *input.shape))
        return _done([output])

    _allgather_base = all_gather_single  # the name torch before 2.13 calls

    def barrier(self, opts=None):
        return _done(None)

    def broadcast(self, tensors, opts=None):
        return _done(tensors)


def create_emulated_group(common_options, stand_ins: StandIns) -> EmulatedProcessGroup:
    """Backend creator for ``dist.init_process_group(BACKEND, ..., pg_options=stand_ins)``."""
    if common_options.group_rank != 0:
        raise ValueError(f"an emulated run is rank 0 of its job, not rank {common_options.group_rank}")
    return EmulatedProcessGroup(common_options.group_rank, common_options.group_size, stand_ins)


def register_backend() -> None:
    """Make ``lancet_emulated`` known to c10d (once per process)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, create_emulated_group, extended_api=True, devices=["cpu", "cuda"])


def _functional_kernels(stand_ins: StandIns, check: Callable[[object], None]) -> dict[str, Callable]:
    def all_to_all_single(inp, output_split_sizes, input_split_sizes, group):
        check(group)
        return stand_ins.all_to_all(inp, output_split_sizes, input_split_sizes)

    def all_reduce(inp, reduce_op, group):
        check(group)
        return stand_ins.all_reduce(inp, reduce_op)

    def all_reduce_(inp, reduce_op, group):
        check(group)
        return stand_ins.all_reduce(inp, reduce_op, inplace=True)

    def all_reduce_coalesced(inputs, reduce_op, group):
        check(group)
        return [stand_ins.all_reduce(t, reduce_op) for t in inputs]

    def all_reduce_coalesced_(inputs, reduce_op, group):
        check(group)
        return [stand_ins.all_reduce(t, reduce_op, inplace=True) for t in inputs]

    return {
        "all_to_all_single": all_to_all_single,
        "all_reduce": all_reduce,
        "all_reduce_": all_reduce_,
        "all_reduce_coalesced": all_reduce_coalesced,
        "all_reduce_coalesced_": all_reduce_coalesced_,
        "wait_tensor": stand_ins.wait,
    }


def install_functional(stand_ins: StandIns, group_name: str) -> torch.library.Library:
    """Route the functional collectives of ``group_name`` to ``stand_ins``; ``library._destroy()`` undoes it."""

    def check(group) -> None:
        name = group if isinstance(group, str) else getattr(group, "group_name", group)
        if name != group_name:
            raise RuntimeError(f"collective on process group {name!r} in an emulated run (only {group_name!r} exists)")

    library = torch.library.Library("_c10d_functional", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overriding the registered kernels is the point
        for name, kernel in _functional_kernels(stand_ins, check).items():
            for key in ("CPU", "CUDA"):
                library.impl(name, kernel, key)
    return library
