"""Build ``transformers`` MoE causal LMs from a known name, a config file or a local checkpoint; never downloads.

Known names (random initialisation):

- ``mixtral-tiny``, ``qwen3-moe-tiny``, ``qwen2-moe-tiny``, ``olmoe-tiny``: 2 layers, hidden 32, 4 experts,
  top-2, vocabulary 128 (tests and CPU runs);
- ``qwen3-moe-h200``: Qwen3-MoE-shaped (hidden 2048, 16 heads of 128, 4 KV heads, 12 layers, 32 experts
  of 768, top-4, Qwen's 151936 vocabulary), about 2.6B parameters: fp32 master weights, AdamW state and
  bf16 activations of 4 x 2048 tokens fit one H200.

A path is a directory (or its ``config.json``): with weights (``save_pretrained``) the checkpoint is
loaded; with a config alone the model is initialised at random.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lancet.integrations.hf import CausalLM, make_expert_parallel, topk_gate

_TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=128,
    max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral-tiny": ("MixtralConfig", dict(_TINY, intermediate_size=48, num_local_experts=4)),
    "qwen3-moe-tiny": ("Qwen3MoeConfig", dict(
        _TINY, intermediate_size=64, moe_intermediate_size=48, num_experts=4, head_dim=16, norm_topk_prob=True,
        decoder_sparse_step=1)),
    "qwen2-moe-tiny": ("Qwen2MoeConfig", dict(
        _TINY, intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40, num_experts=4,
        norm_topk_prob=False, decoder_sparse_step=1)),
    "olmoe-tiny": ("OlmoeConfig", dict(_TINY, intermediate_size=48, num_experts=4, norm_topk_prob=False)),
    "qwen3-moe-h200": ("Qwen3MoeConfig", dict(
        hidden_size=2048, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=32, num_experts_per_tok=4,
        norm_topk_prob=True, decoder_sparse_step=1, vocab_size=151936, max_position_embeddings=4096,
        tie_word_embeddings=False)),
}
DEFAULT_SHAPES: dict[str, tuple[int, int]] = {"qwen3-moe-h200": (4, 2048)}
"""(batch per rank, sequence length) of a known name; others: (2, 8)."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def known_hf_names() -> list[str]:
    return sorted(KNOWN_CONFIGS)


def _checkpoint_dir(spec: str) -> Path | None:
    path = Path(spec)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{spec}: a model directory needs a config.json")
    return path


def hf_config(spec: str):
    """The ``transformers`` config of a known name or a local directory / config.json; ValueError otherwise."""
    import transformers

    if spec in KNOWN_CONFIGS:
        cls, kwargs = KNOWN_CONFIGS[spec]
        return getattr(transformers, cls)(**kwargs)
    path = _checkpoint_dir(spec)
    if path is None:
        raise ValueError(f"unknown HF model {spec!r}: expected one of {', '.join(known_hf_names())} or a local "
                         "directory with a config.json")
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def has_weights(spec: str) -> bool:
    path = _checkpoint_dir(spec) if spec not in KNOWN_CONFIGS else None
    return path is not None and any((path / f).is_file() for f in WEIGHT_FILES)


def load_causal_lm(
    spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """The full (not yet expert-parallel) ``transformers`` model: the checkpoint's weights, or seeded random ones."""
    import transformers

    if has_weights(spec):
        return transformers.AutoModelForCausalLM.from_pretrained(
            _checkpoint_dir(spec), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation,
        ).to(device)
    config = hf_config(spec)
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )


@dataclass(kw_only=True, slots=True, frozen=True)
class HFModelConfig:
    """A ``transformers`` model run by the app: what the app reads of a model config (as ``GPT2MoEConfig``)."""

    name: str
    """Known name or path."""
    batch_size: int
    seq_len: int
    capacity_factor: float | None = None
    """None: dropless top-k."""
    aux_loss_coef: float = 0.0
    loss_chunk_tokens: int | None = None
    config: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.config is None:
            object.__setattr__(self, "config", hf_config(self.name))
        for label, value in (("batch_size", self.batch_size), ("seq_len", self.seq_len)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise ValueError(f"sequence length {self.seq_len} is longer than {self.name}'s {limit} positions")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def tokens_per_rank(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def gate(self):
        return topk_gate(self.config.num_experts_per_tok, self.capacity_factor, self.aux_loss_coef)

    def total_experts(self, world_size: int) -> int:
        config = self.config
        return getattr(config, "num_local_experts", None) or config.num_experts

    def validate_for(self, world_size: int) -> None:
        experts = self.total_experts(world_size)
        if experts % world_size:
            raise ValueError(f"{self.name}: {experts} experts are not divisible by {world_size} ranks")

    def build(self, group: dist.ProcessGroup | None, device: torch.device | str = "cpu", seed: int = 0) -> CausalLM:
        model = load_causal_lm(self.name, device=device, seed=seed)
        make_expert_parallel(model, group, capacity_factor=self.capacity_factor, aux_loss_coef=self.aux_loss_coef)
        return CausalLM(model, self.loss_chunk_tokens)


def hf_model_config(spec: str, batch_size: int | None = None, seq_len: int | None = None, **kwargs) -> HFModelConfig:
    """``HFModelConfig`` with the known name's default shape where ``batch_size`` / ``seq_len`` are None."""
    default_batch, default_seq = DEFAULT_SHAPES.get(spec, (2, 8))
    return HFModelConfig(name=spec, batch_size=batch_size or default_batch, seq_len=seq_len or default_seq, **kwargs)
