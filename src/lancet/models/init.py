"""Deterministic, shard-independent parameter initialisation.

Every tensor is drawn from its own CPU generator seeded by (seed, parameter
name) and, for experts, the global expert index. A rank holding experts 2..3
therefore gets exactly the values a single process holding all experts has
for them, and replicated parameters agree across ranks without a broadcast.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from lancet.moe.experts import GroupedExperts

GPT2_INIT_STD = 0.02


def _generator(seed: int, *key: object) -> torch.Generator:
    digest = zlib.crc32("/".join(str(k) for k in (seed, *key)).encode())
    return torch.Generator().manual_seed(digest)


def _fill(param: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(values.to(param.device, param.dtype))


def _init_experts(name: str, module: GroupedExperts, seed: int) -> None:
    for weight_name, bias_name in (("w1", "b1"), ("w2", "b2")):
        weight, bias = getattr(module, weight_name), getattr(module, bias_name)
        bound = 1.0 / math.sqrt(weight.shape[1])  # nn.Linear's default bound
        for local in range(module.num_experts):
            expert = module.first_expert + local
            gen = _generator(seed, name, weight_name, expert)
            _fill(weight[local], torch.empty(weight.shape[1:]).uniform_(-bound, bound, generator=gen))
            gen = _generator(seed, name, bias_name, expert)
            _fill(bias[local], torch.empty(bias.shape[1:]).uniform_(-bound, bound, generator=gen))


def init_parameters(model: nn.Module, seed: int) -> None:
    """GPT-2 style init (normal 0.02 weights, zero biases, unit LayerNorm); experts like nn.Linear."""
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            _init_experts(name, module, seed)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            gen = _generator(seed, name, "weight")
            _fill(module.weight, torch.empty(module.weight.shape).normal_(0.0, GPT2_INIT_STD, generator=gen))
            if getattr(module, "bias", None) is not None:
                with torch.no_grad():
                    module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.zero_()
