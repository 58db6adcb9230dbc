"""An MoE reference that shares no dispatch code with lancet: Python gate rules, every expert run densely.

Per token: the kept flag from a plain Python implementation of the capacity rule, and
out = weight * expert_e(x) computed with every expert on every token (one process, all experts).
With ``parts`` > 1 each contiguous slice of T / parts tokens is routed on its own, with its own
capacity: the micro-batch semantics of a partitioned padded layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lancet.models import GPT2MoEConfig, build_model
from lancet.moe import MoELayer, MoEOutput
from lancet.step.train_step import TrainStep


def python_positions(experts: list[int], probs: list[float], num_experts: int, kind: str) -> list[int]:
    """Each token's 0-based arrival position at its expert in serving order. switch: token order;
    batch_prioritized: highest probability first, ties to the earlier token."""
    if kind == "switch":
        order = range(len(experts))
    else:
        order = sorted(range(len(experts)), key=lambda t: (-probs[t], t))
    taken = [0] * num_experts
    positions = [0] * len(experts)
    for t in order:
        positions[t] = taken[experts[t]]
        taken[experts[t]] += 1
    return positions


def python_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """int(cf * ceil(T / E)) slots per expert."""
    return int(capacity_factor * math.ceil(num_tokens / num_experts))


def python_keep(
    experts: list[int], probs: list[float], num_experts: int, capacity_factor: float, kind: str
) -> list[bool]:
    """A token is kept when it arrives (``python_positions``) while its expert has a free slot of
    ``python_capacity``."""
    capacity = python_capacity(len(experts), num_experts, capacity_factor)
    return [position < capacity for position in python_positions(experts, probs, num_experts, kind)]


class DenseReferenceMoE(nn.Module):
    """Stands in for an ``MoELayer`` holding all experts; same parameter names (router, experts)."""

    def __init__(self, layer: MoELayer, parts: int = 1) -> None:
        super().__init__()
        self.router = layer.router
        self.experts = layer.experts
        self.gate = layer.gate_cfg
        self.parts = parts

    def _expert(self, e: int, x_TM: Tensor) -> Tensor:
        ex = self.experts
        return torch.relu(x_TM @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]

    def forward(self, x_BSM: Tensor) -> MoEOutput:
        tokens_TM = x_BSM.reshape(-1, x_BSM.shape[-1])
        probs_TE = torch.softmax(self.router(tokens_TM).float(), dim=-1)
        weight_T, expert_T = probs_TE.max(dim=-1)
        num_tokens, num_experts = probs_TE.shape
        step = num_tokens // self.parts
        keep: list[bool] = []
        for start in range(0, num_tokens, step):
            experts = expert_T[start : start + step].tolist()
            probs = weight_T[start : start + step].tolist()
            keep += python_keep(experts, probs, num_experts, self.gate.capacity_factor, self.gate.kind)
        keep_T = torch.tensor(keep)
        out_TM = torch.zeros_like(tokens_TM)
        for e in range(num_experts):
            chosen_T = (expert_T == e) & keep_T
            out_TM = out_TM + torch.where(chosen_T[:, None], weight_T[:, None] * self._expert(e, tokens_TM), 0.0)
        aux = probs_TE.new_zeros(())
        if self.gate.aux_loss_coef > 0:
            fraction_E = torch.stack([(expert_T == e).float().mean() for e in range(num_experts)])
            aux = self.gate.aux_loss_coef * num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        return MoEOutput(out=out_TM.view_as(x_BSM), aux_loss=aux, keep_TK=keep_T[:, None])


def dense_reference_step(
    cfg: GPT2MoEConfig, world: int, shards: list[tuple[Tensor, Tensor]], seed: int = 0, parts: int = 1
):
    """Mean loss over shards (one per rank), gradients by parameter name, per-shard keep masks."""
    model = build_model(cfg, None, seed=seed, world_size=world)
    for block in model.blocks:
        if isinstance(block.mlp, MoELayer):
            block.mlp = DenseReferenceMoE(block.mlp, parts)
    step = TrainStep(model, None)
    params = step.parameters()
    grads = [torch.zeros_like(p) for p in params]
    losses, keeps = [], []
    for tokens, targets in shards:
        result = step(params, tokens, targets)
        losses.append(result.loss)
        keeps.append(result.keep)
        for g, r in zip(grads, result.grads):
            g.add_(r / world)
    return losses, dict(zip(step.param_names, grads)), keeps
