"""An emulated rank equals rank 0 of a real gloo run built so that every peer mirrors rank 0.

In that run every rank holds rank 0's batch, rank 0's local experts and dense weights, and rank r's
router rows are rank 0's rotated by r * L, so rank r routes to rank 0 exactly the rows rank 0 routes to
rank r. Rank 0's loss, dropped tokens and gradients then equal the emulated rank's, except the router's
gradient, which the real all-reduce sums over rotated copies.
"""

from __future__ import annotations

import torch

from lancet.app.data import BatchSource
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.moe.experts import GroupedExperts
from lancet.runtime.emulation import EmulationSpec, emulated_runtime
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks
from tests.emulation import toy_regime

GATES = [GateConfig(kind="switch"), GateConfig(kind="topk", topk=2)]
RTOL, ATOL = 1e-5, 1e-6  # fp32, sums reassociated across ranks
WORLD = 2


def _config(gate: GateConfig):
    return model_config("gpt2_moe_nl3_m32_nh2_sl8_b3", vocab_size=97, gate=gate)


def _rank0_batch(cfg):
    return BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=3).batch(0, 0)


def _mirror_rank0(model, cfg, rank: int, world: int) -> None:
    """Give this rank rank 0's local experts, and rank 0's router rows rotated by rank * L."""
    whole = build_model(cfg, None, seed=1, world_size=world)
    local = cfg.total_experts(world) // world
    mine, reference = dict(model.named_modules()), dict(whole.named_modules())
    with torch.no_grad():
        for name, module in mine.items():
            if isinstance(module, GroupedExperts):
                for param, full in zip(module.parameters(), reference[name].parameters()):
                    param.copy_(full[:local])
            elif name.endswith("router"):
                module.weight.copy_(torch.roll(reference[name].weight, shifts=-rank * local, dims=0))


def _result(step: TrainStep, cfg) -> dict:
    """Loss, keep masks and gradients as numpy arrays (they cross process boundaries by value)."""
    result = step(step.parameters(), *_rank0_batch(cfg))
    return {"loss": result.loss.numpy(), "keep": [k.numpy() for k in result.keep],
            "grads": {name: g.detach().numpy() for name, g in zip(step.param_names, result.grads)}}


def _real_rank(group, gates):
    rank, world = group.rank(), group.size()
    results = []
    for gate in gates:
        cfg = _config(gate)
        model = build_model(cfg, group, seed=1)
        _mirror_rank0(model, cfg, rank, world)
        results.append(_result(TrainStep(model, group), cfg))
    return results


def test_emulated_rank_equals_mirrored_gloo_rank0():
    real = run_ranks(_real_rank, WORLD, GATES)[0]
    with emulated_runtime(EmulationSpec(world_size=WORLD, regime=toy_regime(0.0, 0.0))) as runtime:
        emulated = [_result(TrainStep(build_model(_config(g), runtime.group, seed=1), runtime.group), _config(g))
                    for g in GATES]
    for ours, theirs in zip(emulated, real):
        torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=RTOL, atol=ATOL)
        for a, b in zip(ours["keep"], theirs["keep"]):
            assert (a == b).all(), "dropped-token sets differ"
        compared = [name for name in ours["grads"] if not name.endswith("router.weight")]
        assert any("experts" in name for name in compared)
        for name in compared:
            torch.testing.assert_close(ours["grads"][name], theirs["grads"][name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}: {m}")
