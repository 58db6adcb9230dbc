"""Helpers for emulation tests: toy regimes, the tied-expert reference of an emulated rank."""

from __future__ import annotations

import torch

from lancet.cost.comm import CommProfile, PiecewiseLinear
from lancet.models import GPT2MoEConfig, build_model
from lancet.moe.experts import GroupedExperts
from lancet.runtime.regimes import Regime
from lancet.step.train_step import TrainStep, expert_parameter_names

MiB = 2**20


def toy_regime(latency_ms: float, ms_per_mib: float, measured_world: int = 2) -> Regime:
    """A wire of ``latency_ms`` plus ``ms_per_mib`` per MiB per rank (both collectives), measured on ``measured_world``."""
    curve = PiecewiseLinear([(0.0, latency_ms), (64.0 * MiB, latency_ms + 64.0 * ms_per_mib)])
    comm = CommProfile(curves={"all_to_all": curve, "all_reduce": curve})
    return Regime(name="toy", comm=comm, measured_world=measured_world, source="test curve", path="")


def tied_reference(cfg: GPT2MoEConfig, world: int, tokens: torch.Tensor, targets: torch.Tensor, seed: int):
    """What an emulated rank 0 of ``world`` ranks must compute (the contract of ``lancet.runtime.emulation``).

    One process holds all E = world * L experts, expert e carrying the weights of rank 0's local expert
    e mod L, and runs rank 0's batch. Returns (loss, keep masks, expected gradients of the emulated rank
    by parameter name): dense gradients as this process computes them; local expert l's gradient is
    1/world of the sum over experts l, L + l, ... .
    """
    model = build_model(cfg, None, seed=seed, world_size=world)
    local = cfg.total_experts(world) // world
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                tied = torch.arange(module.num_experts) % local
                for param in module.parameters():
                    param.copy_(param[tied])
    step = TrainStep(model, None)
    result = step(step.parameters(), tokens, targets)
    experts = expert_parameter_names(model)
    expected = {}
    for name, grad in zip(step.param_names, result.grads):
        if name in experts:
            grad = grad.reshape(world, local, *grad.shape[1:]).sum(dim=0) / world
        expected[name] = grad
    return result.loss, result.keep, expected
