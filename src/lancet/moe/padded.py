"""Padded dispatch: fixed-size expert buffers, equal-split all-to-alls, no host sync.

Shape legend: T tokens on this rank, E experts in total, W ranks, L = E / W
local experts, C capacity per expert per rank, M model dim.

Each token gets a slot ``expert * C + position within its expert`` (or -1 when
its expert is full) and is scattered into an ``[E, C, M]`` buffer; empty slots
hold zeros. The buffer, viewed as ``[W, L*C, M]``, goes through one all-to-all
with splits ``[1] * W`` (whatever C is), experts run on ``[L, W*C, M]`` as
batched GEMMs, the reverse all-to-all brings rows home, and each kept token
takes its row back times its gate weight (dropped tokens get zeros).

Everything whose size depends on the token count is a custom op that derives
the capacity ``int(cf * ceil(T / E))`` from its own input:

- ``lancet::capacity_slots(expert_T, priority_T, E, cf) -> slot_T``
- ``lancet::slot_scatter(rows_TM, slot_T, E, cf) -> buffer_ECM``
- ``lancet::slot_gather(buffer_ECM, slot_T, E, cf) -> rows_TM``

and every reshape leaves the capacity dim as -1. So a copy of the stage that
runs on a subset of the tokens (a part of a partitioned layer) computes that
subset's own capacity and drops: micro-batch semantics, with static shapes and
nothing read back by the host. The two data ops are each other's backward.

The ops stay opaque in the captured graph (the passes read them); inside a
compiled region, where shapes are fixed, they are traced through their
implementations (``IMPLEMENTATIONS``, ``lancet.runtime.inline_ops``) so Inductor
fuses them with their neighbours.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from lancet.moe.gates import _positions_in_order, capacity
from lancet.moe.priority_positions import positions


def _capacity_of(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    cap = capacity(num_tokens, num_experts, capacity_factor)
    if cap < 1:
        raise ValueError(
            f"capacity int({capacity_factor:g} * ceil({num_tokens} / {num_experts})) is 0: every token would be "
            "dropped; raise the capacity factor or give the layer more tokens"
        )
    return cap


def capacity_slots_impl(expert_T: Tensor, priority_T: Tensor | None, num_experts: int,
                        capacity_factor: float) -> Tensor:
    """Slot of each token in the ``[E, C]`` buffer, -1 when dropped; C from these T tokens.

    Tokens are served in token order (``priority_T`` None: the switch gate's first come, first served)
    or by descending priority, ties to the earlier token (the batch-prioritized gate).
    """
    cap = _capacity_of(expert_T.shape[0], num_experts, capacity_factor)
    if priority_T is None:
        position_T = _positions_in_order(expert_T, num_experts)
    else:
        position_T = positions(expert_T, priority_T, num_experts)
    return torch.where(position_T < cap, expert_T * cap + position_T, torch.full_like(position_T, -1))


capacity_slots = torch.library.custom_op("lancet::capacity_slots", capacity_slots_impl, mutates_args=())


@capacity_slots.register_fake
def _capacity_slots_fake(expert_T, priority_T, num_experts, capacity_factor):
    _capacity_of(expert_T.shape[0], num_experts, capacity_factor)
    return torch.empty_like(expert_T, dtype=torch.int64)


def slot_scatter_impl(rows_TM: Tensor, slot_T: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """``[E, C, M]`` buffer holding row t at slot ``slot_T[t]``; dropped rows are left out, empty slots are 0."""
    num_tokens, d_model = rows_TM.shape
    slots = num_experts * _capacity_of(num_tokens, num_experts, capacity_factor)
    # Dropped rows land in one extra row past the end, which is cut off.
    index_T = torch.where(slot_T >= 0, slot_T, torch.full_like(slot_T, slots))
    buffer = rows_TM.new_zeros(slots + 1, d_model).index_copy(0, index_T, rows_TM)
    return buffer[:slots].view(num_experts, -1, d_model)


slot_scatter = torch.library.custom_op("lancet::slot_scatter", slot_scatter_impl, mutates_args=())


@slot_scatter.register_fake
def _slot_scatter_fake(rows_TM, slot_T, num_experts, capacity_factor):
    cap = _capacity_of(rows_TM.shape[0], num_experts, capacity_factor)
    return rows_TM.new_empty(num_experts, cap, rows_TM.shape[1])


def _check_buffer(buffer_ECM: Tensor, slot_T: Tensor, num_experts: int, capacity_factor: float) -> None:
    cap = _capacity_of(slot_T.shape[0], num_experts, capacity_factor)
    if tuple(buffer_ECM.shape[:2]) != (num_experts, cap):
        raise ValueError(
            f"slot_gather: buffer of shape {tuple(buffer_ECM.shape)} does not hold {num_experts} experts x "
            f"capacity {cap} for {slot_T.shape[0]} tokens"
        )


def slot_gather_impl(buffer_ECM: Tensor, slot_T: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Row ``slot_T[t]`` of the buffer for every token t, zeros for dropped tokens."""
    _check_buffer(buffer_ECM, slot_T, num_experts, capacity_factor)
    flat_SM = buffer_ECM.reshape(-1, buffer_ECM.shape[-1])
    rows_TM = flat_SM.index_select(0, slot_T.clamp_min(0))
    return torch.where((slot_T >= 0)[:, None], rows_TM, torch.zeros_like(rows_TM))


slot_gather = torch.library.custom_op("lancet::slot_gather", slot_gather_impl, mutates_args=())

IMPLEMENTATIONS = {"capacity_slots": capacity_slots_impl, "slot_scatter": slot_scatter_impl,
                   "slot_gather": slot_gather_impl}
"""Each op's implementation by op name: plain torch code, which a compiled region traces in the op's place."""


@slot_gather.register_fake
def _slot_gather_fake(buffer_ECM, slot_T, num_experts, capacity_factor):
    _check_buffer(buffer_ECM, slot_T, num_experts, capacity_factor)
    return buffer_ECM.new_empty(slot_T.shape[0], buffer_ECM.shape[-1])


def _save_slots(ctx, inputs, output) -> None:
    _, slot_T, num_experts, capacity_factor = inputs
    ctx.save_for_backward(slot_T)
    ctx.num_experts, ctx.capacity_factor = num_experts, capacity_factor


def _scatter_backward(ctx, grad_ECM: Tensor):
    (slot_T,) = ctx.saved_tensors
    return slot_gather(grad_ECM.contiguous(), slot_T, ctx.num_experts, ctx.capacity_factor), None, None, None


def _gather_backward(ctx, grad_TM: Tensor):
    (slot_T,) = ctx.saved_tensors
    return slot_scatter(grad_TM.contiguous(), slot_T, ctx.num_experts, ctx.capacity_factor), None, None, None


torch.library.register_autograd("lancet::slot_scatter", _scatter_backward, setup_context=_save_slots)
torch.library.register_autograd("lancet::slot_gather", _gather_backward, setup_context=_save_slots)


def exchange_even(rows_W: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-to-all of dim 0 (one block per rank, splits ``[1] * W``) with autograd; identity in one process."""
    if group is None:
        return rows_W
    world = dist.get_world_size(group)
    if rows_W.shape[0] != world:
        raise ValueError(f"an even exchange needs one block per rank ({world}), got {rows_W.shape[0]}")
    blocks = [1] * world
    return funcol.all_to_all_single_autograd(rows_W, blocks, blocks, group)
