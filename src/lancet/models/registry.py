"""Model names: ``gpt2_moe_nl{L}_m{M}_nh{H}_sl{S}_b{B}`` plus a registry of named configs.

Any name of that pattern builds a model; the registry lists the paper's four
configurations and small ones for tests and CPU runs.
"""

from __future__ import annotations

import re

from lancet.models.gpt2_moe import GPT2MoEConfig

_NAME_RE = re.compile(r"^gpt2_moe_nl(\d+)_m(\d+)_nh(\d+)_sl(\d+)_b(\d+)$")

NAMED_MODELS: dict[str, str] = {
    # The paper's configurations (b is per-GPU batch).
    "paper_small_p3dn": "gpt2_moe_nl12_m768_nh16_sl512_b16",
    "paper_small_p4de": "gpt2_moe_nl12_m768_nh16_sl512_b48",
    "paper_large_p3dn": "gpt2_moe_nl24_m1024_nh16_sl512_b8",
    "paper_large_p4de": "gpt2_moe_nl24_m1024_nh16_sl512_b24",
    # Small ones for CPU runs and tests.
    "cpu_small": "gpt2_moe_nl2_m64_nh4_sl32_b4",
    "tiny": "gpt2_moe_nl2_m32_nh2_sl8_b2",
}


def known_model_names() -> list[str]:
    return sorted(set(NAMED_MODELS) | set(NAMED_MODELS.values()))


def model_config(name: str, **overrides) -> GPT2MoEConfig:
    """Config for a pattern name or a registry alias; raises ValueError on anything else."""
    canonical = NAMED_MODELS.get(name, name)
    match = _NAME_RE.match(canonical)
    if match is None:
        raise ValueError(
            f"unknown model {name!r}: expected gpt2_moe_nl<L>_m<M>_nh<H>_sl<S>_b<B> "
            f"or one of {', '.join(sorted(NAMED_MODELS))}"
        )
    num_layers, d_model, num_heads, seq_len, batch = (int(g) for g in match.groups())
    return GPT2MoEConfig(
        name=canonical,
        num_layers=num_layers,
        d_model=d_model,
        num_heads=num_heads,
        seq_len=seq_len,
        batch_size=batch,
        **overrides,
    )
