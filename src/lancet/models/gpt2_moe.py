"""GPT-2 with every other block's MLP replaced by an expert-parallel MoE layer.

Shape legend: B batch, S sequence, M model dim, V vocabulary, H heads.
Blocks 0, 2, 4, ... hold the MoE layer (ReLU experts); the others a dense
GELU MLP. Positions are learned; attention is causal SDPA; the LM head is tied
to the token embedding, as in GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lancet.losses import linear_cross_entropy
from lancet.moe import GateConfig, MoELayer


VOCAB_ALIGNMENT = 64


@dataclass(kw_only=True, slots=True, frozen=True)
class GPT2MoEConfig:
    """Model shape. ``batch_size`` is per rank."""

    name: str = ""
    num_layers: int
    d_model: int
    num_heads: int
    seq_len: int
    batch_size: int
    vocab_size: int = 50257
    max_positions: int = 1024
    experts_per_rank: int = 2
    num_experts: int | None = None
    """Total experts; None means experts_per_rank * world size."""
    moe_every: int = 2
    """Blocks whose index is a multiple of this hold the MoE layer."""
    dropout: float = 0.0
    gate: GateConfig = field(default_factory=GateConfig)
    loss_chunk_tokens: int | None = None
    """Tokens per chunk of the fused LM-head cross entropy (None: chunks of at most 256 MiB of float32 logits)."""

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by {self.num_heads} heads")
        if self.seq_len > self.max_positions:
            raise ValueError(
                f"sequence length {self.seq_len} is longer than the position table ({self.max_positions} positions)"
            )
        for label, value in (("num_layers", self.num_layers), ("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")

    def total_experts(self, world_size: int) -> int:
        return self.num_experts if self.num_experts is not None else self.experts_per_rank * world_size

    def validate_for(self, world_size: int) -> None:
        """Raise ValueError if this model cannot run on ``world_size`` ranks."""
        experts = self.total_experts(world_size)
        if experts % world_size:
            raise ValueError(f"{experts} experts are not divisible by {world_size} ranks")
        if self.gate.experts_per_token > experts:
            raise ValueError(
                f"top-{self.gate.experts_per_token} routing is larger than the number of experts ({experts})"
            )

    def is_moe_block(self, index: int) -> bool:
        return index % self.moe_every == 0

    @property
    def tokens_per_rank(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: the vocabulary rounded up to a multiple of 64.

        A 50257-wide LM-head GEMM misses the tensor-core alignment and runs several times slower;
        the extra rows are never indexed and their logits are masked in the loss.
        """
        return -(-self.vocab_size // VOCAB_ALIGNMENT) * VOCAB_ALIGNMENT


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2MoEConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x_BSM: Tensor) -> Tensor:
        batch, seq, d_model = x_BSM.shape
        q, k, v = self.qkv(x_BSM).split(d_model, dim=2)
        heads = lambda t: t.view(batch, seq, self.num_heads, d_model // self.num_heads).transpose(1, 2)  # noqa: E731
        y_BHSD = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y_BHSD.transpose(1, 2).reshape(batch, seq, d_model))


class DenseMLP(nn.Module):
    def __init__(self, cfg: GPT2MoEConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x_BSM: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x_BSM)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2MoEConfig, index: int, group: dist.ProcessGroup | None, world_size: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_block(index)
        if self.is_moe:
            self.mlp = MoELayer(cfg.d_model, 4 * cfg.d_model, cfg.total_experts(world_size), cfg.gate, group)
        else:
            self.mlp = DenseMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSM: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x_BSM = x_BSM + self.drop(self.attn(self.ln_1(x_BSM)))
        if self.is_moe:
            moe = self.mlp(self.ln_2(x_BSM))
            return x_BSM + self.drop(moe.out), moe.aux_loss, moe.keep_TK
        return x_BSM + self.drop(self.mlp(self.ln_2(x_BSM))), None, None


@dataclass(slots=True)
class ModelOutput:
    hidden_BSM: Tensor
    """Final hidden states (after the last layer norm): the LM head's input."""
    head_weight_PM: Tensor
    """The LM head's weight (tied to the token embedding; rows padded to a multiple of 64)."""
    vocab_size: int
    aux_loss: Tensor
    """Sum of the MoE layers' load-balancing losses."""
    keep: list[Tensor]
    """Per MoE layer, which token choices were dispatched."""
    loss_chunk_tokens: int | None = None

    def logits(self) -> Tensor:
        """``[B, S, V]`` logits (materialised; the loss does not need them)."""
        return F.linear(self.hidden_BSM, self.head_weight_PM)[..., : self.vocab_size]


class GPT2MoE(nn.Module):
    """The model of one expert-parallel rank (or, with ``group=None``, all experts in one process).

    ``world_size`` must be given when ``group`` is None and the model stands
    in for a larger group (it fixes the total number of experts).
    """

    def __init__(self, cfg: GPT2MoEConfig, group: dist.ProcessGroup | None, world_size: int | None = None) -> None:
        super().__init__()
        world = dist.get_world_size(group) if group is not None else (world_size or 1)
        cfg.validate_for(world)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, group, world) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens_BS: Tensor) -> ModelOutput:
        seq = tokens_BS.shape[1]
        positions_S = torch.arange(seq, device=tokens_BS.device)
        x_BSM = self.drop(self.wte(tokens_BS) + self.wpe(positions_S))
        aux = x_BSM.new_zeros((), dtype=torch.float32)
        keep: list[Tensor] = []
        for block in self.blocks:
            x_BSM, block_aux, block_keep = block(x_BSM)
            if block_aux is not None:
                aux = aux + block_aux
                keep.append(block_keep)
        return ModelOutput(
            hidden_BSM=self.ln_f(x_BSM), head_weight_PM=self.wte.weight, vocab_size=self.cfg.vocab_size,
            aux_loss=aux, keep=keep, loss_chunk_tokens=self.cfg.loss_chunk_tokens,
        )

    @staticmethod
    def loss(out: ModelOutput, targets_BS: Tensor) -> Tensor:
        return lm_loss(out, targets_BS)


def lm_loss(out: ModelOutput, targets_BS: Tensor) -> Tensor:
    """Mean next-token cross entropy (float32, ``lancet.losses.linear_cross_entropy``) plus the auxiliary loss."""
    hidden_NM = out.hidden_BSM.reshape(-1, out.hidden_BSM.shape[-1])
    ce = linear_cross_entropy(
        hidden_NM, out.head_weight_PM, targets_BS.reshape(-1), out.vocab_size, out.loss_chunk_tokens
    )
    return ce + out.aux_loss


def build_model(
    cfg: GPT2MoEConfig,
    group: dist.ProcessGroup | None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    world_size: int | None = None,
) -> GPT2MoE:
    """Construct on the meta device, materialise on ``device``, and initialise deterministically."""
    from lancet.models.init import init_parameters

    with torch.device("meta"):
        model = GPT2MoE(cfg, group, world_size=world_size)
    model.to_empty(device=device)
    init_parameters(model, seed)
    return model
