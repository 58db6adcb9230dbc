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

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lancet.models import ModelOutput, lm_loss
from lancet.moe import GateConfig, MoELayer
from lancet.moe.dispatch import group_size
from lancet.moe.experts import ACTIVATIONS, GroupedGatedExperts, SharedExpert


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
    """Stands in for a sparse MoE block: ``[B, S, M] -> [B, S, M]``, remembering the keep mask and aux loss.

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
        self.keep_TK: Tensor | None = None
        self.aux_loss: Tensor | None = None

    def forward(self, hidden_BSM: Tensor) -> Tensor:
        out = super().forward(hidden_BSM)
        self.keep_TK, self.aux_loss = out.keep_TK, out.aux_loss
        return out.out

    def take(self) -> tuple[Tensor, Tensor]:
        """The last forward's keep mask and aux loss (forgotten here, so no step holds on to them)."""
        if self.keep_TK is None:
            raise RuntimeError("ExpertParallelBlock.take() before a forward")
        taken = (self.keep_TK, self.aux_loss)
        self.keep_TK = self.aux_loss = None
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


def _gate_config(block: nn.Module, kind: BlockKind, capacity_factor: float | None, aux_loss_coef: float) -> GateConfig:
    renormalise = kind.renormalise if isinstance(kind.renormalise, bool) else bool(getattr(block.gate, kind.renormalise))
    return GateConfig(
        kind="topk", topk=block.gate.top_k, normalize_topk=renormalise, dispatch="ragged",
        dropless=capacity_factor is None, capacity_factor=capacity_factor or 1.0, aux_loss_coef=aux_loss_coef,
    )


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
    Switch load-balancing loss per layer (not the class's own ``router_aux_loss_coef`` loss).
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


def _rebuild_buffers(module: nn.Module, args) -> None:
    """Forward pre-hook: the module's buffers as fresh tensors built from their values.

    A captured step takes parameters, tokens and targets as inputs; a buffer (the rotary embedding's
    ``inv_freq``) would be a tensor from outside the trace. Rebuilt from a Python list, it is a constant
    of the graph instead.
    """
    for name, values in module._lancet_buffer_values.items():
        real = module._lancet_buffers[name]
        setattr(module, name, torch.tensor(values, dtype=real.dtype, device=real.device))


def _restore_buffers(module: nn.Module, args, output) -> None:
    for name, real in module._lancet_buffers.items():
        setattr(module, name, real)


def buffers_as_constants(model: nn.Module) -> None:
    """Make every buffer of ``model`` a constant of each forward (see ``_rebuild_buffers``)."""
    for module in model.modules():
        own = {name: b for name, b in module.named_buffers(recurse=False) if b is not None}
        if own:
            module._lancet_buffers = own
            module._lancet_buffer_values = {name: b.tolist() for name, b in own.items()}
            module.register_forward_pre_hook(_rebuild_buffers)
            module.register_forward_hook(_restore_buffers)


class CausalLM(nn.Module):
    """A ``transformers`` causal LM (made expert-parallel) as ``TrainStep`` takes it: ``tokens -> ModelOutput``.

    ``hf.model`` is the decoder (its last hidden state is after the final norm) and ``hf.lm_head`` the head.
    """

    def __init__(self, hf: nn.Module, loss_chunk_tokens: int | None = None) -> None:
        super().__init__()
        if not expert_parallel_blocks(hf):
            raise ValueError("CausalLM wraps a model made expert-parallel first (make_expert_parallel)")
        for part in ("model", "lm_head"):
            if not isinstance(getattr(hf, part, None), nn.Module):
                raise TypeError(f"{type(hf).__name__} has no '{part}' module: not a transformers causal LM")
        self.hf = hf
        self.loss_chunk_tokens = loss_chunk_tokens
        buffers_as_constants(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.lm_head.weight.shape[0]

    def forward(self, tokens_BS: Tensor) -> ModelOutput:
        hidden_BSM = self.hf.model(input_ids=tokens_BS, use_cache=False).last_hidden_state
        taken = [block.take() for block in expert_parallel_blocks(self.hf)]
        aux = hidden_BSM.new_zeros((), dtype=torch.float32)
        for _, layer_aux in taken:
            aux = aux + layer_aux
        return ModelOutput(
            hidden_BSM=hidden_BSM, head_weight_PM=self.hf.lm_head.weight, vocab_size=self.vocab_size, aux_loss=aux,
            keep=[keep for keep, _ in taken], loss_chunk_tokens=self.loss_chunk_tokens,
        )

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
