"""Routers: which expert(s) each token goes to, with what weight, and whether it is kept.

Shape legend: T tokens on this rank, E experts in total, K experts per token.

Every decision is made with tensor ops (no Python branching on values) so the
whole step can be traced. Capacity is per rank: ``int(cf * ceil(T / E))``.

Where the keep decision is made depends on the dispatch. With the ragged
dispatch the router decides it here (a capacity computed from the whole batch).
With the padded dispatch the capacity decision belongs to the dispatch
(``lancet.moe.padded``): it computes each token's slot in fixed-size buffers
from whatever tokens it is given, so ``Routing.keep_TK`` is None here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

GateKind = Literal["switch", "batch_prioritized", "topk"]
RouterKind = Literal["softmax_topk", "topk_softmax"]
ROUTER_KINDS: tuple[str, ...] = ("softmax_topk", "topk_softmax")
GATE_KINDS: tuple[str, ...] = ("switch", "batch_prioritized", "topk")
DispatchKind = Literal["padded", "ragged"]
DISPATCH_KINDS: tuple[str, ...] = ("padded", "ragged")


def default_dispatch(kind: str) -> str:
    """Capacity gates use the padded dispatch; the dropless top-k gate the ragged one."""
    return "ragged" if kind == "topk" else "padded"


@dataclass(kw_only=True, slots=True, frozen=True)
class GateConfig:
    """How tokens are routed."""

    kind: GateKind = "switch"
    """switch: top-1, first-come capacity; batch_prioritized: top-1, capacity by
    probability; topk: any k, dropless."""
    topk: int = 2
    """Experts per token for the topk gate (top-1 gates ignore it)."""
    capacity_factor: float = 1.0
    """Capacity = int(capacity_factor * ceil(tokens / experts)) for top-1 gates (and the topk gate when not ``dropless``)."""
    normalize_topk: bool = True
    """Renormalise the k chosen probabilities of the topk gate to sum to one (softmax_topk router)."""
    router: RouterKind = "softmax_topk"
    """topk gate: softmax over all experts then the k largest (Mixtral, Qwen-MoE, OLMoE), or the k
    largest logits then a softmax over those k (always summing to one)."""
    dropless: bool = True
    """topk gate: every choice is dispatched. False: each expert takes at most
    ``int(capacity_factor * ceil(T * K / E))`` assignments, first choices before second ones, each in
    token order (ragged dispatch; the rest are dropped)."""
    aux_loss_coef: float = 0.0
    """Weight of the load-balancing loss (0 disables it)."""
    dispatch: DispatchKind | None = None
    """padded: fixed ``[E, C, M]`` buffers and equal-split all-to-alls, no host sync (capacity gates
    only; a partitioned layer gives each part its own capacity). ragged: only kept rows travel, split
    sizes read by the host once per layer, whole-batch capacity in partitions. None: padded for the
    capacity gates, ragged for topk."""

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate {self.kind!r}; choose one of {', '.join(GATE_KINDS)}")
        if self.dispatch is None:
            object.__setattr__(self, "dispatch", default_dispatch(self.kind))
        if self.dispatch not in DISPATCH_KINDS:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_KINDS)}")
        if self.kind == "topk" and self.dispatch == "padded":
            raise ValueError("the topk gate is dropless or drops per expert on the whole batch; the padded dispatch takes top-1 gates only: use --dispatch ragged")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTER_KINDS)}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")

    @property
    def experts_per_token(self) -> int:
        return self.topk if self.kind == "topk" else 1

    @property
    def padded(self) -> bool:
        return self.dispatch == "padded"


@dataclass(slots=True)
class Routing:
    """The router's decision for T tokens, K choices each."""

    expert_TK: Tensor
    """int64 expert index of each choice."""
    weight_TK: Tensor
    """Combine weight of each choice (float32)."""
    keep_TK: Tensor | None
    """bool: the choice is dispatched (False: dropped for capacity). None under the padded dispatch,
    which decides it (``lancet.moe.padded.capacity_slots``)."""
    aux_loss: Tensor
    """Load-balancing loss (a 0-dim float32 tensor, zero when disabled)."""


def capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    return int(capacity_factor * math.ceil(num_tokens / num_experts))


def _positions_in_order(expert_T: Tensor, num_experts: int) -> Tensor:
    """0-based arrival position of each token within its expert, in tensor order."""
    # Scan along the contiguous last dim: a cumsum down a [T, E] column runs E serial scans on the GPU. A
    # comparison rather than F.one_hot: elementwise (Inductor fuses it), and no check of the values that
    # would read them back on the host (which fake tensors, in a compiled region's trace, refuse).
    experts_E = torch.arange(num_experts, device=expert_T.device)
    one_hot_ET = (expert_T[None, :] == experts_E[:, None]).to(torch.int64)
    return (torch.cumsum(one_hot_ET, dim=1) * one_hot_ET).sum(dim=0) - 1


def switch_keep(expert_T: Tensor, num_experts: int, cap: int) -> Tensor:
    """First come, first served: a token is kept if fewer than ``cap`` earlier tokens chose its expert."""
    return _positions_in_order(expert_T, num_experts) < cap


def positions_by_argsort(expert_T: Tensor, priority_T: Tensor, num_experts: int) -> Tensor:
    """0-based position of each token within its expert, highest priority first, ties to the earlier token:
    a stable descending sort of all priorities."""
    order_T = torch.argsort(priority_T, descending=True, stable=True)
    position_sorted_T = _positions_in_order(expert_T[order_T], num_experts)
    return torch.empty_like(position_sorted_T).scatter_(0, order_T, position_sorted_T)


def batch_prioritized_keep(expert_T: Tensor, prob_T: Tensor, num_experts: int, cap: int) -> Tensor:
    """Capacity slots go to the tokens with the highest top-1 probability (ties: earlier token)."""
    return positions_by_argsort(expert_T, prob_T, num_experts) < cap


def topk_keep(expert_TK: Tensor, num_experts: int, cap: int) -> Tensor:
    """Top-k with capacity: first choices are served before second ones, each in token order."""
    expert_KT = expert_TK.t().reshape(-1)
    return (_positions_in_order(expert_KT, num_experts) < cap).view(expert_TK.shape[1], -1).t()


def _topk(probs_TE: Tensor, logits_TE: Tensor, cfg: GateConfig) -> tuple[Tensor, Tensor]:
    """Weights and experts of the k choices of each token."""
    if cfg.router == "topk_softmax":
        top_logits_TK, expert_TK = torch.topk(logits_TE.float(), cfg.topk, dim=-1)
        return torch.softmax(top_logits_TK, dim=-1), expert_TK
    weight_TK, expert_TK = torch.topk(probs_TE, cfg.topk, dim=-1)
    if cfg.normalize_topk:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return weight_TK, expert_TK


def load_balancing_loss(probs_TE: Tensor, expert_T: Tensor) -> Tensor:
    """Switch Transformer loss: E * sum_e (fraction routed to e) * (mean probability of e)."""
    num_experts = probs_TE.shape[1]
    fraction_E = F.one_hot(expert_T, num_experts).to(probs_TE.dtype).mean(dim=0)
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()


def route(logits_TE: Tensor, cfg: GateConfig) -> Routing:
    """Turn router logits into a Routing. Probabilities are computed in float32."""
    num_tokens, num_experts = logits_TE.shape
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if cfg.kind == "topk":
        weight_TK, expert_TK = _topk(probs_TE, logits_TE, cfg)
        if cfg.dropless:
            keep_TK = torch.ones_like(expert_TK, dtype=torch.bool)
        else:
            keep_TK = topk_keep(expert_TK, num_experts, capacity(num_tokens * cfg.topk, num_experts, cfg.capacity_factor))
    else:
        weight_T, expert_T = torch.max(probs_TE, dim=-1)
        keep_TK = None
        if not cfg.padded:
            cap = capacity(num_tokens, num_experts, cfg.capacity_factor)
            if cfg.kind == "switch":
                keep_T = switch_keep(expert_T, num_experts, cap)
            else:
                keep_T = batch_prioritized_keep(expert_T, weight_T, num_experts, cap)
            keep_TK = keep_T[:, None]
        expert_TK, weight_TK = expert_T[:, None], weight_T[:, None]
    if cfg.aux_loss_coef > 0:
        aux = cfg.aux_loss_coef * load_balancing_loss(probs_TE, expert_TK[:, 0])
    else:
        aux = probs_TE.new_zeros(())
    return Routing(expert_TK=expert_TK, weight_TK=weight_TK, keep_TK=keep_TK, aux_loss=aux)
