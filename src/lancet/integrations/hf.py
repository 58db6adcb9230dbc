"""HuggingFace ``transformers`` MoE causal LMs made expert-parallel with lancet's MoE layer.

Shape legend: B batch, S sequence, M hidden size, E experts, L = E / W local
experts, I expert intermediate size, V vocabulary.

``make_expert_parallel(model, group)`` replaces every sparse MoE block of a
known class, in place, by an ``ExpertParallelBlock`` around ``MoELayer`` that
holds this rank's experts ``[rank * L, (rank + 1) * L)``, sliced from the
block's own weights (the full expert tensors are dropped with the block). The
math is the class's:

============================  ==============================================  ==============
class                         router                                          shared expert
============================  ==============================================  ==============
MixtralSparseMoeBlock         softmax (fp32) -> top-k -> renormalise          --
Qwen3MoeSparseMoeBlock        softmax (fp32) -> top-k -> renormalise if       --
                              ``norm_topk_prob``
Qwen2MoeSparseMoeBlock        as Qwen3-MoE                                    sigmoid-gated
OlmoeSparseMoeBlock           as Qwen3-MoE (OLMoE: ``norm_topk_prob`` false)  --
============================  ==============================================  ==============

Experts are gated FFNs ``down(act(x W_gate) * x W_up)`` with the class's
activation (``hidden_act``). HF stores ``gate_up_proj`` as ``[E, 2I, M]`` and
``down_proj`` as ``[E, M, I]`` (``F.linear`` weights); lancet's grouped GEMMs
take ``[L, M, 2I]`` and ``[L, I, M]``, the transposes. Routing is dropless
(ragged dispatch) unless a capacity factor is given. One difference under bf16
only: lancet casts the combine weights to the rows' dtype before the product
(Qwen-MoE and OLMoE do too; Mixtral multiplies by the fp32 weights).

``CausalLM`` wraps the model for ``TrainStep``: its forward returns a
``ModelOutput`` (the decoder's last hidden state and the ``lm_head`` weight),
so the loss is lancet's fused chunked cross entropy (``lm_loss``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lancet.models import ModelOutput, lm_loss
from lancet.moe import GateConfig, MoELayer
from lancet.moe.dispatch import group_size
from lancet.moe.experts import ACTIVATIONS, GroupedGatedExperts, SharedExpert
from lancet.moe.layer import MoEOutput
from lancet.step.train_step import is_tracing


@dataclass(frozen=True, slots=True)
class BlockKind:
    """How one sparse MoE block class routes."""

    renormalise: str | bool
    """True/False, or the router attribute that says (``norm_topk_prob``)."""
    shared_expert: bool = False


KNOWN_BLOCKS: dict[str, BlockKind] = {
    "MixtralSparseMoeBlock": BlockKind(renormalise=True),
    "Qwen3MoeSparseMoeBlock": BlockKind(renormalise="norm_topk_prob"),
    "Qwen2MoeSparseMoeBlock": BlockKind(renormalise="norm_topk_prob", shared_expert=True),
    "OlmoeSparseMoeBlock": BlockKind(renormalise="norm_topk_prob"),
}


class UnsupportedMoEBlock(TypeError):
    """A module looks like a sparse MoE block but is not one of ``KNOWN_BLOCKS`` (or lacks their structure)."""


def _missing(block: nn.Module, kind: BlockKind | None) -> list[str]:
    """What ``block`` lacks of the structure the known classes share."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    missing = []
    for owner, label, attrs in (
        (gate, "gate", ("weight", "top_k")),
        (experts, "experts", ("gate_up_proj", "down_proj", "act_fn", "num_experts")),
    ):
        if owner is None:
            missing.append(f"a '{label}' submodule")
        else:
            missing += [f"{label}.{a}" for a in attrs if not hasattr(owner, a)]
    if kind is not None and kind.shared_expert:
        missing += [a for a in ("shared_expert", "shared_expert_gate") if not hasattr(block, a)]
    return missing


def _check_block(name: str, block: nn.Module) -> BlockKind:
    cls = type(block).__name__
    kind = KNOWN_BLOCKS.get(cls)
    missing = _missing(block, kind)
    if kind is None:
        raise UnsupportedMoEBlock(
            f"{name}: sparse MoE block class {cls} is not supported (known: {', '.join(KNOWN_BLOCKS)}); its routing "
            "math is unknown" + (f", and it has no {', '.join(missing)}" if missing else "")
        )
    if missing:
        raise UnsupportedMoEBlock(f"{name}: {cls} lacks {', '.join(missing)} (this transformers version differs)")
    if getattr(block, "jitter_noise", 0.0) > 0:
        raise UnsupportedMoEBlock(f"{name}: {cls} with router jitter noise {block.jitter_noise} is not supported")
    return kind


def sparse_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding routed experts (an ``experts`` child), by qualified name; nested ones skipped."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) or any(name.startswith(f + ".") for f, _ in found):
            continue
        if isinstance(getattr(module, "experts", None), nn.Module):
            found.append((name, module))
    return found


class ExpertParallelBlock(MoELayer):
    """Stands in for a sparse MoE block: ``[B, S, M] -> [B, S, M]``, remembering the keep mask, aux loss and
    router logits.

    A ``MoELayer`` itself (not a wrapper), so that graph passes see the layer at the block's own name.
    """

    def __init__(
        self, router_weight_EM: Tensor, gate: GateConfig, group: dist.ProcessGroup | None,
        experts: GroupedGatedExperts, shared_expert: SharedExpert | None,
    ) -> None:
        num_experts, d_model = router_weight_EM.shape
        with torch.device("meta"):  # the router is built empty, then given the block's weight
            super().__init__(d_model, 1, num_experts, gate, group, experts=experts, shared_expert=shared_expert)
        self.router.weight = _parameter(router_weight_EM)
        self.last: MoEOutput | None = None

    def forward(self, hidden_BSM: Tensor) -> Tensor:
        self.last = super().forward(hidden_BSM)
        return self.last.out

    def take(self) -> MoEOutput:
        """The last forward's output (keep mask, aux loss, router logits); forgotten here, so no step holds on
        to it."""
        if self.last is None:
            raise RuntimeError("ExpertParallelBlock.take() before a forward")
        taken, self.last = self.last, None
        return taken


def _parameter(values: Tensor) -> nn.Parameter:
    return nn.Parameter(values.detach().clone().contiguous())


def _activation_name(experts: nn.Module, config) -> str:
    name = getattr(config, "hidden_act", None)
    if name not in ACTIVATIONS:
        raise UnsupportedMoEBlock(
            f"expert activation {name!r} ({type(experts.act_fn).__name__}) is not one of {', '.join(ACTIVATIONS)}"
        )
    return name


def _local_experts(experts: nn.Module, config, group: dist.ProcessGroup | None) -> GroupedGatedExperts:
    """This rank's slice of ``experts``, transposed to lancet's ``[L, M, 2I]`` / ``[L, I, M]`` layout."""
    total, two_i, d_model = experts.gate_up_proj.shape
    world = group_size(group)
    if total % world:
        raise ValueError(f"{total} experts cannot be split evenly over {world} ranks")
    local = total // world
    first = (0 if group is None else dist.get_rank(group)) * local
    out = GroupedGatedExperts(local, d_model, two_i // 2, _activation_name(experts, config), first_expert=first)
    shard = slice(first, first + local)
    out.w_gate_up = _parameter(experts.gate_up_proj[shard].transpose(1, 2))
    out.w_down = _parameter(experts.down_proj[shard].transpose(1, 2))
    return out


def _shared_expert(block: nn.Module, config) -> SharedExpert:
    mlp = block.shared_expert
    d_hidden, d_model = mlp.gate_proj.weight.shape
    shared = SharedExpert(d_model, d_hidden, _activation_name(mlp, config), sigmoid_gate=True)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(shared, name).weight = _parameter(getattr(mlp, name).weight)
    shared.gate.weight = _parameter(block.shared_expert_gate.weight)
    return shared


def topk_gate(top_k: int, capacity_factor: float | None, aux_loss_coef: float, renormalise: bool = True) -> GateConfig:
    """The topk gate of an HF block: ragged dispatch, dropless unless ``capacity_factor`` is given."""
    return GateConfig(
        kind="topk", topk=top_k, normalize_topk=renormalise, dispatch="ragged",
        dropless=capacity_factor is None, capacity_factor=capacity_factor or 1.0, aux_loss_coef=aux_loss_coef,
    )


def _gate_config(block: nn.Module, kind: BlockKind, capacity_factor: float | None, aux_loss_coef: float) -> GateConfig:
    renormalise = kind.renormalise if isinstance(kind.renormalise, bool) else bool(getattr(block.gate, kind.renormalise))
    return topk_gate(block.gate.top_k, capacity_factor, aux_loss_coef, renormalise)


def expert_parallel_block(
    block: nn.Module, kind: BlockKind, config, group: dist.ProcessGroup | None, capacity_factor: float | None,
    aux_loss_coef: float,
) -> ExpertParallelBlock:
    """Lancet's layer with ``block``'s router, this rank's experts and (Qwen2-MoE) its shared expert."""
    experts = _local_experts(block.experts, config, group)
    shared = _shared_expert(block, config) if kind.shared_expert else None
    gate = _gate_config(block, kind, capacity_factor, aux_loss_coef)
    return ExpertParallelBlock(block.gate.weight, gate, group, experts, shared)


def make_expert_parallel(
    model: nn.Module, group: dist.ProcessGroup | None, *, capacity_factor: float | None = None,
    aux_loss_coef: float = 0.0,
) -> nn.Module:
    """Replace every sparse MoE block of ``model`` in place by this rank's expert-parallel layer; returns ``model``.

    ``group=None`` keeps all experts in one process. ``capacity_factor`` (None: dropless) caps each expert
    at ``int(cf * ceil(T * K / E))`` of the rank's T*K assignments. ``aux_loss_coef`` > 0 adds lancet's
    Switch load-balancing loss per layer; the class's own loss (``output_router_logits`` and
    ``router_aux_loss_coef`` in its config) is ``CausalLM``'s.
    Raises ``UnsupportedMoEBlock`` for a block class it does not know, before changing anything.
    """
    blocks = sparse_moe_blocks(model)
    if not blocks:
        raise UnsupportedMoEBlock(f"{type(model).__name__} has no sparse MoE block (no module with an 'experts' child)")
    kinds = [_check_block(name, block) for name, block in blocks]
    config = getattr(model, "config", None)
    for (name, block), kind in zip(blocks, kinds):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, expert_parallel_block(block, kind, config, group, capacity_factor, aux_loss_coef))
    return model


def expert_parallel_blocks(model: nn.Module) -> list[ExpertParallelBlock]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelBlock)]


CAUSAL_ATTENTION = "lancet_causal_sdpa"
"""The attention ``CausalLM`` selects: transformers' SDPA attention with no mask tensor (``is_causal``)."""


def _no_mask(*args, **kwargs) -> None:
    return None


def use_causal_attention(hf: nn.Module) -> None:
    """Causal SDPA without a mask tensor: every sequence is whole (no padding, no packing), as in lancet's batches.

    transformers otherwise builds a ``[B, 1, S, S]`` mask while tracing (it cannot rule out packed
    sequences), which neither partitions along the batch nor is needed.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_ATTENTION, _no_mask)
    hf.set_attn_implementation(CAUSAL_ATTENTION)


def _real(values: Tensor) -> tuple[list, torch.dtype, torch.device]:
    return values.tolist(), values.dtype, values.device


def _constant(values: tuple[list, torch.dtype, torch.device]) -> Tensor:
    data, dtype, device = values
    return torch.tensor(data, dtype=dtype, device=device)


class ConstantRotary(nn.Module):
    """The decoder's rotary embedding, whose ``(cos, sin)`` tables are constants of a traced step.

    A captured step's inputs are parameters, tokens and targets; the rotary's ``inv_freq`` buffer would
    be a tensor from outside the trace, and the tables depend on nothing but the sequence length
    (positions ``0..S-1``: ``CausalLM`` passes none). Traced, the tables are computed outside the trace
    once per (length, dtype) and enter the graph as constants.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._tables: dict[tuple, tuple] = {}

    def forward(self, x_BSM: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        if not is_tracing():
            return self.inner(x_BSM, position_ids)
        key = (x_BSM.shape[1], x_BSM.dtype, x_BSM.device)
        if key not in self._tables:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

            with unset_fake_temporarily(), disable_proxy_modes_tracing():
                probe = torch.zeros(1, key[0], 1, dtype=key[1], device=key[2])
                positions = torch.arange(key[0], device=key[2])[None]
                cos, sin = self.inner(probe, positions)
                self._tables[key] = (_real(cos), _real(sin))
        cos, sin = self._tables[key]
        return _constant(cos), _constant(sin)


def _sliding_window(config) -> int | None:
    if config is None or not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)


def class_balance_loss(hf: nn.Module) -> Callable:
    """The load-balancing loss function of ``hf``'s modeling module (``load_balancing_loss_func``, as the class
    calls it when its config sets ``output_router_logits``); a clear error for a class without one."""
    module = sys.modules.get(type(hf).__module__)
    function = getattr(module, "load_balancing_loss_func", None)
    if not callable(function):
        raise UnsupportedMoEBlock(
            f"{type(hf).__name__} sets output_router_logits but its module {type(hf).__module__} has no "
            "load_balancing_loss_func to reproduce its router loss; set output_router_logits=False")
    return function


class CausalLM(nn.Module):
    """A ``transformers`` causal LM (made expert-parallel) as ``TrainStep`` takes it: ``tokens -> ModelOutput``.

    ``hf.model`` is the decoder (its last hidden state is after the final norm) and ``hf.lm_head`` the head.
    When the config sets ``output_router_logits``, the loss adds the class's own router loss as the class
    does: ``router_aux_loss_coef * load_balancing_loss_func(router logits of every layer, E, top_k)``, over
    this rank's tokens (the router is replicated, so each rank's term is the original model's on its batch).
    """

    def __init__(self, hf: nn.Module, loss_chunk_tokens: int | None = None) -> None:
        super().__init__()
        blocks = expert_parallel_blocks(hf)
        if not blocks:
            raise ValueError("CausalLM wraps a model made expert-parallel first (make_expert_parallel)")
        for part in ("model", "lm_head"):
            if not isinstance(getattr(hf, part, None), nn.Module):
                raise TypeError(f"{type(hf).__name__} has no '{part}' module: not a transformers causal LM")
        self.hf = hf
        self._blocks = blocks  # a plain list (not registered again as submodules), walked once, not per step
        self.loss_chunk_tokens = loss_chunk_tokens
        self.sliding_window = _sliding_window(getattr(hf, "config", None))
        use_causal_attention(hf)
        if not isinstance(getattr(hf.model, "rotary_emb", None), nn.Module):
            raise TypeError(f"{type(hf).__name__}.model has no rotary_emb: not a supported decoder")
        hf.model.rotary_emb = ConstantRotary(hf.model.rotary_emb)
        config = getattr(hf, "config", None)
        self.router_aux_loss_coef = (float(getattr(config, "router_aux_loss_coef", 0.0))
                                     if getattr(config, "output_router_logits", False) else 0.0)
        self.balance_loss = class_balance_loss(hf) if self.router_aux_loss_coef else None

    @property
    def vocab_size(self) -> int:
        return self.hf.lm_head.weight.shape[0]

    def forward(self, tokens_BS: Tensor) -> ModelOutput:
        if self.sliding_window is not None and tokens_BS.shape[1] > self.sliding_window:
            raise ValueError(f"sequences of {tokens_BS.shape[1]} tokens exceed the sliding window "
                             f"({self.sliding_window}): only full causal attention is supported")
        hidden_BSM = self.hf.model(input_ids=tokens_BS, use_cache=False).last_hidden_state
        taken = [block.take() for block in self._blocks]
        aux = hidden_BSM.new_zeros((), dtype=torch.float32)
        for layer in taken:
            aux = aux + layer.aux_loss
        if self.balance_loss is not None:
            aux = aux + self.router_aux_loss_coef * self._router_loss(taken)
        return ModelOutput(
            hidden_BSM=hidden_BSM, head_weight_PM=self.hf.lm_head.weight, vocab_size=self.vocab_size, aux_loss=aux,
            keep=[layer.keep_TK for layer in taken], loss_chunk_tokens=self.loss_chunk_tokens,
        )

    def _router_loss(self, taken: list[MoEOutput]) -> Tensor:
        block = self._blocks[0]
        return self.balance_loss(tuple(layer.router_logits_TE for layer in taken), block.num_experts,
                                 block.gate_cfg.experts_per_token, None)

    def logits(self, tokens_BS: Tensor) -> Tensor:
        return self(tokens_BS).logits()

    @staticmethod
    def loss(out: ModelOutput, targets_BS: Tensor) -> Tensor:
        return lm_loss(out, targets_BS)


def hf_parameter(name: str) -> tuple[str, bool]:
    """The original model's parameter for a ``CausalLM`` parameter name, and whether it is an expert shard.

    Expert shards (``w_gate_up``, ``w_down``) are slices of the original's ``gate_up_proj`` / ``down_proj``
    along dim 0, transposed in their last two dims.
    """
    name = name.removeprefix("hf.")
    renames = {
        ".router.weight": ".gate.weight",
        ".experts.w_gate_up": ".experts.gate_up_proj",
        ".experts.w_down": ".experts.down_proj",
        ".shared_expert.gate.weight": ".shared_expert_gate.weight",
    }
    for ours, theirs in renames.items():
        if name.endswith(ours):
            return name.removesuffix(ours) + theirs, ".experts." in ours
    return name, False
