"""Collectives that nothing overlaps, issued on the compute stream: no branch to NCCL's stream and back.

A functional collective (``_c10d_functional.all_to_all_single``, ``all_reduce``) runs on its process
group's own stream: the compute stream records an event, that stream waits for it and runs the collective,
and ``wait_tensor`` makes the compute stream wait in turn. Captured in a CUDA graph, each is a fork to a
second stream and a join back. Where the plan puts nothing between a collective's start and its wait,
that fork buys no overlap. ``inline_candidates`` finds such collectives in the step graph (none while
another is in flight) and ``inline_collectives`` retargets them in a phase of the step program: the start
becomes the blocking c10d call (``async_op=False``), which torch issues on the current stream (since
torch 2.8), and the wait becomes the identity.

Off unless asked (``ExecutorConfig.inline_collectives``, default from ``LANCET_INLINE_COLLECTIVES=1``):
whether a graph without those branches replays with less idle time is a measurement (docs/results.md,
run 16: the replayed forward waits longer before library kernels when the graph branches).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import fx
from torch.distributed.distributed_c10d import _resolve_process_group

from lancet.graph.roles import WAIT_OPS, Role, node_role

ENV = "LANCET_INLINE_COLLECTIVES"

_functional = torch.ops._c10d_functional
_REDUCE_OPS = {name: op for op, name in funcol.REDUCE_OP_TO_STR.items()}
"""The functional all-reduce's op names (torch's own table), back to c10d's ops."""


def inline_from_environment() -> bool:
    """``LANCET_INLINE_COLLECTIVES`` is ``1`` (ranks inherit it); any other value but ``0``/unset raises."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def all_to_all_single_now(inp: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                          group_name: str) -> torch.Tensor:
    """``_c10d_functional.all_to_all_single`` followed by its wait, as one blocking c10d call."""
    group = _resolve_process_group(group_name)
    inp = inp.contiguous()
    rows = sum(output_split_sizes) if output_split_sizes else inp.shape[0]
    out = inp.new_empty((rows, *inp.shape[1:]))
    dist.all_to_all_single(out, inp, list(output_split_sizes) or None, list(input_split_sizes) or None,
                           group=group)
    return out


def all_reduce_now(inp: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    """``_c10d_functional.all_reduce`` followed by its wait, as one blocking c10d call."""
    op = _REDUCE_OPS.get(reduce_op.lower())
    if op is None:
        raise ValueError(f"all_reduce: unknown reduce op {reduce_op!r}")
    out = inp.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=_resolve_process_group(group_name))
    return out


def completed(tensor: torch.Tensor) -> torch.Tensor:
    """The wait of an inlined collective: its result is complete when the call returns."""
    return tensor


_BLOCKING = {_functional.all_to_all_single.default: all_to_all_single_now,
             _functional.all_reduce.default: all_reduce_now}


def _group_is_emulated(group_name) -> bool:
    """Whether ``group_name`` names a group of the ``lancet_emulated`` backend (an unknown name: no)."""
    from lancet.runtime.emulated_group import BACKEND

    try:
        return dist.get_backend(_resolve_process_group(group_name)) == BACKEND
    except (RuntimeError, ValueError):
        return False


def inline_candidates(graph: fx.Graph) -> set[str]:
    """Names of the all-to-all and all-reduce starts of a step graph that may run as blocking calls.

    Contract: a start qualifies when its wait is the very next node and its only user, no other collective
    is in flight when it starts (inside another's window it would share the communicator with a collective
    on NCCL's stream, from another stream), and its group is not emulated (the stand-ins model the
    communication stream). The graph is not changed.
    """
    nodes = list(graph.nodes)
    in_flight: set[fx.Node] = set()
    names: set[str] = set()
    for start, after in zip(nodes, [*nodes[1:], None]):
        role = node_role(start) if start.op == "call_function" else None
        if role == Role.COMM_WAIT:
            in_flight.discard(start.args[0])
        if role != Role.COMM_START:
            continue
        waited_next = (start.target in _BLOCKING and after is not None and node_role(after) == Role.COMM_WAIT
                       and after.args[0] is start and list(start.users) == [after])
        if waited_next and not in_flight and not _group_is_emulated(start.args[-1]):
            names.add(start.name)
        else:
            in_flight.add(start)
    return names


def inline_collectives(gm: fx.GraphModule, names: set[str]) -> int:
    """Retarget the starts named in ``names`` (``inline_candidates`` of the step graph) and their waits in
    ``gm``, a phase of the step program; returns how many.

    Contract: ``gm`` computes the same values (the same collective on the same data), its collectives keep
    their order and every node its name; a named start whose wait is not its only user in ``gm`` is left as
    it is. ``gm`` is changed in place; the caller recompiles it.
    """
    inlined = 0
    for start in gm.graph.nodes:
        if start.op != "call_function" or start.name not in names or start.target not in _BLOCKING:
            continue
        users = list(start.users)
        if len(users) != 1 or users[0].target not in WAIT_OPS:
            continue
        start.target = _BLOCKING[start.target]
        users[0].target = completed
        inlined += 1
    return inlined
