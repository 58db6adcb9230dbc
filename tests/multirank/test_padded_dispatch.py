"""Padded dispatch on gloo ranks: equal to an independent dense reference, sync-free when captured,
partitioned with micro-batch drops."""

from __future__ import annotations

import pytest
import torch

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_forward, capture_step
from lancet.graph.analysis import analyze
from lancet.graph.roles import Role
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.partition.rewrite import PartitionDecisions, Region, partition_pass
from lancet.passes.partition.select import dispatch_ranges
from lancet.plan.plan import capture_partitioned_step
from lancet.runtime.captured import CapturedStep
from lancet.step.train_step import TrainStep, expert_parameter_names
from tests.dense_reference import dense_reference_step
from tests.distributed import run_ranks
from tests.multirank.test_pass_partition import attention_ranges

GATES = [
    GateConfig(kind="switch"),
    GateConfig(kind="batch_prioritized"),
    GateConfig(kind="switch", capacity_factor=0.5, aux_loss_coef=0.01),
]
# fp32 at the noise floor of reassociated sums (ranks and parts sum partial gradients in another order).
RTOL, ATOL = 1e-5, 1e-6
BATCH = 6  # divisible by 2 and 3


def _config(gate: GateConfig, batch: int = 3):
    return model_config(f"gpt2_moe_nl3_m32_nh2_sl4_b{batch}", vocab_size=97, gate=gate)


def _source(cfg) -> BatchSource:
    return BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=3)


def _assert_matches(result, param_names, reference, rank: int, local_experts: int, experts: set[str], what: str):
    ref_losses, ref_grads, ref_keeps = reference
    torch.testing.assert_close(result.loss, ref_losses[rank], rtol=RTOL, atol=ATOL)
    for name, grad in zip(param_names, result.grads):
        expected = ref_grads[name]
        if name in experts:
            expected = expected[rank * local_experts : (rank + 1) * local_experts]
        torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {name}: {m}")
    for keep, ref_keep in zip(result.keep, ref_keeps[rank]):
        assert torch.equal(keep, ref_keep), f"{what}: dropped-token sets differ"


def _reference_rank(group, gates: list[GateConfig]) -> list[int]:
    """Eager padded step == dense reference; padded keep masks == ragged keep masks on the same batch."""
    rank, world = group.rank(), group.size()
    kept = []
    for gate in gates:
        cfg = _config(gate)
        model = build_model(cfg, group, seed=1)
        step = TrainStep(model, group)
        source = _source(cfg)
        batch = source.batch(0, rank)
        result = step(step.parameters(), *batch)
        reference = dense_reference_step(cfg, world, [source.batch(0, r) for r in range(world)], seed=1)
        local = cfg.total_experts(world) // world
        _assert_matches(result, step.param_names, reference, rank, local, expert_parameter_names(model), gate.kind)
        ragged_cfg = _config(GateConfig(kind=gate.kind, capacity_factor=gate.capacity_factor,
                                        aux_loss_coef=gate.aux_loss_coef, dispatch="ragged"))
        ragged = TrainStep(build_model(ragged_cfg, group, seed=1), group)
        ragged_result = ragged(ragged.parameters(), *batch)
        for padded_keep, ragged_keep in zip(result.keep, ragged_result.keep):
            assert torch.equal(padded_keep, ragged_keep), f"{gate.kind}: padded and ragged drop different tokens"
        kept.append(int(sum(k.sum() for k in result.keep)))
    return kept


@pytest.mark.parametrize("world, gates", [(2, GATES), (4, GATES[:2])])
def test_padded_dispatch_matches_a_dense_reference(world, gates):
    kept = run_ranks(_reference_rank, world, gates)
    tokens = 3 * 4 * 2  # per rank and gate: batch 3, sequence 4, two MoE layers
    assert any(k < tokens for per_rank in kept for k in per_rank), "no token was dropped: the test checks nothing"


def _no_data_dependent_sizes(graph) -> bool:
    for node in graph.nodes:
        val = node.meta.get("val")
        values = val if isinstance(val, (tuple, list)) else [val]
        for v in values:
            if isinstance(v, torch.SymInt) or (
                isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape)
            ):
                return False
    return True


PARTITIONS = {"switch": [("dispatch", 2), ("attention", 3)], "batch_prioritized": [("attention", 2), ("dispatch", 3)]}
"""Ranges (into attention: parts route their own tokens; the dispatch stage alone: Tutel-style) and part counts."""


def _captured_rank(group) -> list[tuple]:
    """Captured padded step: no host sync, static sizes, bitwise equal to eager; partitions give per-part drops."""
    rank, world = group.rank(), group.size()
    seen = []
    for gate in GATES[:2]:
        cfg = _config(gate, batch=BATCH)
        model = build_model(cfg, group, seed=7)
        step = TrainStep(model, group, bucket_bytes=8192)
        source = _source(cfg)
        batch = source.batch(0, rank)
        graph = capture_step(step, *batch)
        analysis = analyze(graph)
        assert not [n for n in graph.graph.nodes if analysis.roles[n] in (Role.HOST_SYNC, Role.HOST_WAIT)]
        assert _no_data_dependent_sizes(graph.graph)
        assert len(analysis.moe_layers) == 2
        for layer in analysis.moe_layers:
            assert layer.counts is None and layer.split_nodes == []
            assert layer.combine_grad is not None and layer.dispatch_grad is not None
        assert [c.purpose for c in analysis.collectives_of("all_to_all")] == [
            "dispatch", "combine", "dispatch", "combine",
            "combine_grad", "dispatch_grad", "combine_grad", "dispatch_grad",
        ]
        want = step(step.parameters(), *batch)
        got = CapturedStep(graph)(step.parameters(), *batch)
        assert torch.equal(got.loss, want.loss)
        assert all(torch.equal(g, w) for g, w in zip(got.grads, want.grads))
        forward = capture_forward(step, *batch)
        local = cfg.total_experts(world) // world
        experts = expert_parameter_names(model)
        ranges = {"attention": attention_ranges(forward), "dispatch": dispatch_ranges(forward.graph)}
        for label, parts in PARTITIONS[gate.kind]:
            shards = [source.batch(0, r) for r in range(world)]
            reference = dense_reference_step(cfg, world, shards, seed=7, parts=parts)
            regions = PartitionDecisions([Region(start, end, parts) for start, end in ranges[label]])
            partitioned = capture_partitioned_step(step, partition_pass(forward, regions, BATCH), *batch)
            part_analysis = analyze(partitioned)
            assert not part_analysis.host_syncs
            assert len(part_analysis.collectives_of("all_to_all", "forward")) == 2 * 2 * parts
            assert len(part_analysis.moe_layers) == 2 * parts
            result = CapturedStep(partitioned)(step.parameters(), *batch)
            _assert_matches(result, step.param_names, reference, rank, local, experts, f"{gate.kind} {label} n={parts}")
            seen.append((gate.kind, parts, [int(k.sum()) for k in result.keep], [int(k.sum()) for k in want.keep]))
    return seen


def test_captured_and_partitioned_padded_steps():
    seen = run_ranks(_captured_rank, 2)
    # Per-part capacity really changed which tokens were kept somewhere (so micro-batch drops were checked).
    assert any(part_kept != whole_kept for per_rank in seen for _, _, part_kept, whole_kept in per_rank)
