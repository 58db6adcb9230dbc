"""The ragged dispatch: token dispatch and combine through an irregular all-to-all.

Shape legend: T tokens on this rank, K choices per token, A = T*K assignments,
E experts in total, W ranks, L = E / W local experts, M model dim,
S rows this rank sends (kept assignments), R rows it receives.

Expert e lives on rank e // L as local expert e % L. The path is:

    sort kept assignments by destination expert (stable: original order kept)
    -> counts exchange (a fixed-size all-to-all of E ints)
    -> host reads the split sizes (one sync)
    -> all-to-all of exactly the kept rows (no padding to capacity)
    -> regroup received rows by local expert -> experts -> undo regrouping
    -> reverse all-to-all -> weighted combine into token order

With ``group=None`` the same code runs in one process holding all experts
(no collectives), which is the reference the distributed path must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from lancet.moe.gates import Routing
from lancet.moe.host_copy import host_wait, to_host


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


@dataclass(slots=True)
class DispatchPlan:
    """Where every kept assignment goes, and the split sizes of both all-to-alls."""

    token_of_row_S: Tensor
    """Token index of each sent row, rows sorted by destination expert."""
    weight_of_row_S: Tensor
    """Combine weight of each sent row."""
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_WL: Tensor
    """Rows received from each source rank for each local expert."""


def plan_dispatch(routing: Routing, num_experts: int, group: dist.ProcessGroup | None) -> DispatchPlan:
    """Sort kept assignments by expert and exchange counts; one host sync for split sizes.

    Everything that does not need the split sizes is issued before the host waits for them, so
    that the device has it queued while the host is blocked.
    """
    world = group_size(group)
    local_experts = num_experts // world
    expert_A = routing.expert_TK.reshape(-1)
    keep_A = routing.keep_TK.reshape(-1)
    choices = routing.expert_TK.shape[1]
    # Dropped assignments get the sentinel destination E and sort to the end.
    destination_A = torch.where(keep_A, expert_A, torch.full_like(expert_A, num_experts))
    order_A = torch.argsort(destination_A, stable=True)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_A.device)
    counts_E = counts_E.index_add(0, destination_A, torch.ones_like(destination_A))[:num_experts]
    if group is None:
        recv_counts_E = counts_E
    else:
        recv_counts_E = funcol.all_to_all_single(counts_E, None, None, group)
    send_W = counts_E.view(world, local_experts).sum(dim=1)
    recv_W = recv_counts_E.view(world, local_experts).sum(dim=1)
    # One asynchronous device-to-host copy for all split sizes.
    sizes_host = to_host(torch.cat([send_W, recv_W]))
    token_of_row_A = order_A if choices == 1 else torch.div(order_A, choices, rounding_mode="floor")
    weight_of_row_A = routing.weight_TK.reshape(-1)[order_A]
    # The host waits for the copy just before reading (a schedule may move the wait later); the
    # scalar reads are then host-local.
    splits = host_wait(sizes_host).tolist()
    send_splits, recv_splits = splits[:world], splits[world:]
    for size in splits:
        torch._check(size >= 0)
    num_sent = sum(send_splits)
    torch._check(num_sent <= expert_A.shape[0])
    return DispatchPlan(
        token_of_row_S=token_of_row_A[:num_sent],
        weight_of_row_S=weight_of_row_A[:num_sent],
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_counts_WL=recv_counts_E.view(world, local_experts),
    )


def exchange(rows: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Irregular all-to-all with autograd; identity in a single process."""
    if group is None:
        return rows
    return funcol.all_to_all_single_autograd(rows, out_splits, in_splits, group)


@dataclass(slots=True)
class LocalGroups:
    """Received rows regrouped by local expert."""

    perm_R: Tensor
    """Received row order that groups rows by local expert (stable within an expert)."""
    expert_of_row_R: Tensor
    """Local expert of each regrouped row."""
    offsets_L: Tensor
    """Cumulative row ends per local expert (int32, as grouped GEMMs take them)."""


def group_by_local_expert(recv_counts_WL: Tensor, num_received: int) -> LocalGroups:
    """Received rows arrive ordered (source rank, local expert); reorder to (local expert, source rank).

    The reorder moves whole blocks: block (w, l) starts at ``src`` in arrival order and at ``dst`` in
    grouped order, so grouped row p comes from received row p + src - dst of its block (the stable
    sort by local expert, without sorting).
    """
    world, local_experts = recv_counts_WL.shape
    counts_WL = recv_counts_WL.reshape(-1)
    src_WL = torch.cumsum(counts_WL, dim=0) - counts_WL
    counts_LW = recv_counts_WL.t().reshape(-1)
    dst_LW = torch.cumsum(counts_LW, dim=0) - counts_LW
    shift_LW = src_WL.view(world, local_experts).t().reshape(-1) - dst_LW
    rows_R = torch.arange(num_received, device=recv_counts_WL.device)
    perm_R = rows_R + torch.repeat_interleave(shift_LW, counts_LW, output_size=num_received)
    ends_L = torch.cumsum(recv_counts_WL.sum(dim=0), dim=0)
    expert_of_row_R = torch.searchsorted(ends_L, rows_R, right=True)
    return LocalGroups(perm_R=perm_R, expert_of_row_R=expert_of_row_R, offsets_L=ends_L.to(torch.int32))


def combine(rows_SM: Tensor, plan: DispatchPlan, tokens_TM: Tensor) -> Tensor:
    """Weighted sum of each token's returned rows; dropped tokens get zeros."""
    weighted_SM = rows_SM * plan.weight_of_row_S[:, None].to(rows_SM.dtype)
    out_TM = torch.zeros_like(tokens_TM, dtype=rows_SM.dtype)
    return out_TM.index_add(0, plan.token_of_row_S, weighted_SM)
