"""The expert-parallel MoE layer: router, dispatch, grouped experts, combine.

Shape legend: B batch, S sequence, T = B*S tokens, M model dim, E experts,
L local experts, R received rows.

Traced nodes carry ``meta["custom"]["moe_stage"]``: ``gate`` for the routing
decision, ``dispatch`` for everything from the sort by destination to the
combine. The dispatch stage is row-local: each token's output depends only on
its own row and routing, so it may run on any subset of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx.traceback as fx_traceback
from torch import Tensor, nn

from lancet.moe.dispatch import combine, exchange, group_by_local_expert, group_size, plan_dispatch
from lancet.moe.experts import GroupedExperts
from lancet.moe.gates import GateConfig, route


@dataclass(slots=True)
class MoEOutput:
    out: Tensor
    """Layer output, shaped like the input."""
    aux_loss: Tensor
    """Load-balancing loss of this layer (0-dim)."""
    keep_TK: Tensor
    """Which of each token's choices were dispatched (False: dropped)."""


class MoELayer(nn.Module):
    """Top-k / switch MoE with experts sharded over ``group`` (None: all experts local).

    ``num_experts`` counts experts across the whole group; this rank holds
    experts ``[rank * L, (rank + 1) * L)``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        gate: GateConfig,
        group: dist.ProcessGroup | None,
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
        self.router = nn.Linear(d_model, num_experts, bias=False)
        local = num_experts // world
        rank = 0 if group is None else dist.get_rank(group)
        self.experts = GroupedExperts(local, d_model, d_hidden, first_expert=rank * local)

    def forward(self, x_BSM: Tensor) -> MoEOutput:
        d_model = x_BSM.shape[-1]
        tokens_TM = x_BSM.reshape(-1, d_model)
        with fx_traceback.annotate({"moe_stage": "gate"}):
            routing = route(self.router(tokens_TM), self.gate_cfg)
        # Everything from here to the combine treats each token's row on its own (routing is fixed):
        # the contract that lets a partition pass run it on any subset of tokens.
        with fx_traceback.annotate({"moe_stage": "dispatch"}):
            plan = plan_dispatch(routing, self.num_experts, self.group)
            sent_SM = tokens_TM[plan.token_of_row_S]
            received_RM = exchange(sent_SM, plan.recv_splits, plan.send_splits, self.group)
            groups = group_by_local_expert(plan.recv_counts_WL, received_RM.shape[0])
            expert_out_RM = self.experts(received_RM[groups.perm_R], groups.expert_of_row_R, groups.offsets_L)
            returned_RM = torch.empty_like(expert_out_RM).index_copy(0, groups.perm_R, expert_out_RM)
            back_SM = exchange(returned_RM, plan.send_splits, plan.recv_splits, self.group)
            out_TM = combine(back_SM, plan, tokens_TM)
        return MoEOutput(out=out_TM.view_as(x_BSM).to(x_BSM.dtype), aux_loss=routing.aux_loss, keep_TK=routing.keep_TK)
