"""The expert-parallel MoE layer: router, dispatch, grouped experts, combine.

Shape legend: B batch, S sequence, T = B*S tokens, M model dim, E experts,
L local experts, R received rows.

Traced nodes carry ``lancet.graph.meta.MOE_STAGE``: ``gate`` for the routing
decision, ``dispatch`` (``lancet.graph.meta.dispatch_region``) for everything from the sort by destination (ragged) or
the capacity slots (padded) to the combine. The dispatch stage is row-local:
each token's output depends only on its own row and routing (and, padded, on
the capacity of the tokens it runs on), so it may run on any subset of the
tokens.

Two dispatches (``GateConfig.dispatch``): ``ragged`` (``lancet.moe.dispatch``)
ships only kept rows and reads split sizes on the host once per layer;
``padded`` (``lancet.moe.padded``) ships fixed ``[E, C, M]`` buffers and never
waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lancet.graph import meta
from lancet.moe.dispatch import combine, exchange, group_by_local_expert, group_size, plan_dispatch
from lancet.moe.experts import GroupedExperts, SharedExpert, compute_dtype
from lancet.moe.gates import GateConfig, Routing, route
from lancet.moe.padded import capacity_slots, exchange_even, slot_gather, slot_scatter


@dataclass(slots=True)
class MoEOutput:
    out: Tensor
    """Layer output, shaped like the input."""
    aux_loss: Tensor
    """Load-balancing loss of this layer (0-dim)."""
    keep_TK: Tensor
    """Which of each token's choices were dispatched (False: dropped)."""
    router_logits_TE: Tensor | None = None
    """The router's logits over all experts (for a model's own load-balancing loss)."""


class MoELayer(nn.Module):
    """Top-k / switch MoE with experts sharded over ``group`` (None: all experts local).

    ``num_experts`` counts experts across the whole group; this rank holds
    experts ``[rank * L, (rank + 1) * L)``. ``experts`` replaces the default
    ReLU FFNs with given local experts (e.g. ``GroupedGatedExperts``; ``d_hidden``
    is then unused); ``shared_expert`` adds a dense FFN every token goes through.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        gate: GateConfig,
        group: dist.ProcessGroup | None,
        *,
        experts: GroupedExperts | None = None,
        shared_expert: SharedExpert | None = None,
    ) -> None:
        super().__init__()
        world = group_size(group)
        if num_experts % world:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {world} ranks")
        if gate.experts_per_token > num_experts:
            raise ValueError(f"top-{gate.experts_per_token} routing needs at least that many experts, got {num_experts}")
        self.num_experts = num_experts
        self.gate_cfg = gate
        self.group = group
        self.world = world
        self.router = nn.Linear(d_model, num_experts, bias=False)
        local = num_experts // world
        rank = 0 if group is None else dist.get_rank(group)
        if experts is None:
            experts = GroupedExperts(local, d_model, d_hidden, first_expert=rank * local)
        elif (experts.num_experts, experts.first_expert) != (local, rank * local):
            raise ValueError(
                f"rank {rank} of {world} holds experts {rank * local}..{rank * local + local - 1}, got "
                f"{experts.num_experts} experts starting at {experts.first_expert}"
            )
        self.experts = experts
        self.shared_expert = shared_expert

    @property
    def forward_all_to_alls(self) -> int:
        """All-to-alls one forward of this layer issues: dispatch and combine, plus the counts exchange (ragged)."""
        if self.group is None:
            return 0
        return 2 if self.gate_cfg.padded else 3

    def forward(self, x_BSM: Tensor) -> MoEOutput:
        d_model = x_BSM.shape[-1]
        tokens_TM = x_BSM.reshape(-1, d_model)
        with meta.gate_region():
            logits_TE = self.router(tokens_TM)
            routing = route(logits_TE, self.gate_cfg)
        # Everything from here to the combine treats each token's row on its own (routing is fixed):
        # the contract that lets a partition pass run it on any subset of tokens.
        with meta.dispatch_region():
            if self.gate_cfg.padded:
                out_TM, keep_TK = self._padded(tokens_TM, routing)
            else:
                out_TM, keep_TK = self._ragged(tokens_TM, routing), routing.keep_TK
        if self.shared_expert is not None:
            out_TM = out_TM + self.shared_expert(tokens_TM)
        return MoEOutput(out=out_TM.view_as(x_BSM).to(x_BSM.dtype), aux_loss=routing.aux_loss, keep_TK=keep_TK,
                         router_logits_TE=logits_TE)

    def _ragged(self, tokens_TM: Tensor, routing: Routing) -> Tensor:
        plan = plan_dispatch(routing, self.num_experts, self.group)
        sent_SM = tokens_TM[plan.token_of_row_S]
        received_RM = exchange(sent_SM, plan.recv_splits, plan.send_splits, self.group)
        groups = group_by_local_expert(plan.recv_counts_WL, received_RM.shape[0])
        expert_out_RM = self.experts(received_RM[groups.perm_R], groups.expert_of_row_R, groups.offsets_L)
        returned_RM = torch.empty_like(expert_out_RM).index_copy(0, groups.perm_R, expert_out_RM)
        back_SM = exchange(returned_RM, plan.send_splits, plan.recv_splits, self.group)
        return combine(back_SM, plan, tokens_TM)

    def _padded(self, tokens_TM: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        """Slots -> [E, C, M] buffer -> all-to-all -> experts on [L, W*C, M] -> all-to-all -> weighted gather.

        Capacity dims are left as -1 in every reshape: the capacity is derived from the token count inside
        the custom ops, so the stage runs unchanged on any subset of the tokens.
        """
        experts, cf = self.num_experts, self.gate_cfg.capacity_factor
        world, local, d_model = self.world, self.num_experts // self.world, tokens_TM.shape[-1]
        expert_T, weight_T = routing.expert_TK[:, 0], routing.weight_TK[:, 0]
        priority_T = weight_T.detach() if self.gate_cfg.kind == "batch_prioritized" else None
        slot_T = capacity_slots(expert_T, priority_T, experts, cf)
        dtype = compute_dtype(tokens_TM)
        buffer_ECM = slot_scatter(tokens_TM.to(dtype), slot_T, experts, cf)
        received_WNM = exchange_even(buffer_ECM.view(world, -1, d_model), self.group)
        # Rows arrive as (source rank, local expert, slot); the experts want (local expert, source rank, slot).
        # (contiguous + view, not reshape: reshape would trace with the capacity written out as a constant)
        rows_LNM = received_WNM.view(world, local, -1, d_model).transpose(0, 1).contiguous().view(local, -1, d_model)
        out_LNM = self.experts.forward_padded(rows_LNM)
        back_WNM = out_LNM.view(local, world, -1, d_model).transpose(0, 1).contiguous().view(world, -1, d_model)
        returned_ECM = exchange_even(back_WNM, self.group).view(experts, -1, d_model)
        out_TM = slot_gather(returned_ECM, slot_T, experts, cf) * weight_T[:, None].to(dtype)
        return out_TM, (slot_T >= 0)[:, None]
