"""What each node of a captured step graph is: compute, collective start/wait, host sync.

Functional collectives trace as a start node (``_c10d_functional.all_to_all_single``,
``all_reduce``, ...) and a ``wait_tensor`` node: the collective is in flight
between them, and compute nodes placed in between overlap it.
"""

from __future__ import annotations

import enum
import operator

import torch
from torch import fx

import lancet.moe.host_copy  # noqa: F401  (registers lancet::to_host, lancet::host_wait)

_functional = torch.ops._c10d_functional


class Role(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"
    COMPUTE = "compute"
    COMM_START = "comm_start"
    COMM_WAIT = "comm_wait"
    HOST_SYNC = "host_sync"
    HOST_WAIT = "host_wait"


COLLECTIVE_KINDS: dict[object, str] = {
    _functional.all_to_all_single.default: "all_to_all",
    _functional.all_reduce.default: "all_reduce",
    _functional.all_gather_into_tensor.default: "all_gather",
    _functional.reduce_scatter_tensor.default: "reduce_scatter",
}
WAIT_OPS = {_functional.wait_tensor.default}
HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
"""Scalar reads; a host sync when they read an accelerator tensor."""
HOST_WAIT_OPS = {torch.ops.lancet.host_wait.default}
"""Waits for an asynchronous device-to-host copy: the host blocks, the device does not."""
TO_HOST_OPS = {torch.ops.lancet.to_host.default}
"""The asynchronous device-to-host copy of split sizes: a boundary of compiled regions (its wait is a host wait)."""

# Ops that only reinterpret or describe a tensor (no kernel of substance).
VIEW_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.squeeze.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.unbind.int,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    operator.getitem,
}


def _is_device_to_host_copy(node: fx.Node) -> bool:
    if node.target not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        return False
    val = node.meta.get("val")
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return (
        isinstance(val, torch.Tensor)
        and isinstance(source, torch.Tensor)
        and val.device.type == "cpu"
        and source.device.type != "cpu"
    )


def _reads_device_value(node: fx.Node) -> bool:
    """A scalar read of an accelerator tensor (it stalls the host); reads of CPU tensors do not."""
    source = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    return isinstance(source, torch.Tensor) and source.device.type != "cpu"


def node_role(node: fx.Node) -> Role:
    if node.op == "placeholder":
        return Role.INPUT
    if node.op == "output":
        return Role.OUTPUT
    if node.target in COLLECTIVE_KINDS:
        return Role.COMM_START
    if node.target in WAIT_OPS:
        return Role.COMM_WAIT
    if _is_device_to_host_copy(node) or (node.target in HOST_SYNC_OPS and _reads_device_value(node)):
        return Role.HOST_SYNC
    if node.target in HOST_WAIT_OPS:
        return Role.HOST_WAIT
    return Role.COMPUTE


def collective_kind(node: fx.Node) -> str | None:
    return COLLECTIVE_KINDS.get(node.target)


def is_view(node: fx.Node) -> bool:
    """Metadata-only nodes (views, getitem, symbolic size queries, Python scalar arithmetic)."""
    if node.op != "call_function":
        return False
    if node.target in VIEW_OPS:
        return True
    # Python-level SymInt arithmetic (operator.add on sizes, ...).
    return not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def is_irregular_all_to_all(node: fx.Node) -> bool:
    """An all-to-all whose split sizes are graph values (data-dependent), not constants."""
    if collective_kind(node) != "all_to_all":
        return False
    splits = list(node.args[1] or []) + list(node.args[2] or [])
    return any(isinstance(s, fx.Node) for s in splits)


def carries_tokens(node: fx.Node) -> bool:
    """An all-to-all of token rows (or their gradients): a floating-point payload, padded or ragged.

    Without a recorded value (a hand-built graph), data-dependent split sizes mean token rows. The other
    all-to-alls are fixed-size exchanges of integers (the expert counts of a ragged dispatch).
    """
    if collective_kind(node) != "all_to_all":
        return False
    payload = node.meta.get("val")
    if isinstance(payload, torch.Tensor):
        return payload.dtype.is_floating_point
    return is_irregular_all_to_all(node)


def wait_of(start: fx.Node) -> fx.Node:
    """The wait_tensor node that completes a collective start node."""
    waits = [user for user in start.users if user.target in WAIT_OPS]
    if len(waits) != 1:
        raise ValueError(f"collective {start.name} has {len(waits)} waits; expected exactly one")
    return waits[0]
