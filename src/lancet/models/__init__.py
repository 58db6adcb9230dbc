"""Models: the paper's GPT-2 MoE and its named configurations."""

from lancet.models.gpt2_moe import GPT2MoE, GPT2MoEConfig, ModelOutput, build_model, lm_loss
from lancet.models.registry import NAMED_MODELS, known_model_names, model_config

__all__ = ["GPT2MoE", "build_model", "GPT2MoEConfig", "ModelOutput", "NAMED_MODELS", "known_model_names", "lm_loss", "model_config"]
