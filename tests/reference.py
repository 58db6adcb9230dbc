"""The single-process reference: one model holding all experts, run over every rank's shard."""

from __future__ import annotations

import torch

from lancet.models import GPT2MoEConfig, build_model
from lancet.step.train_step import TrainStep


def reference_step(cfg: GPT2MoEConfig, world: int, shards: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0):
    """Mean loss over shards, its gradients by parameter name, and per-shard keep masks.

    Routing (capacity, priorities) is per shard, as it is per rank in the expert-parallel model.
    """
    model = build_model(cfg, None, seed=seed, world_size=world)
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
