"""Partitioning ranges of the forward into parts (ragged dispatch): same loss, gradients and dropped tokens as
unpartitioned. (Padded layers drop per part: tests/multirank/test_padded_dispatch.py.)"""

from __future__ import annotations

import pytest
import torch

from lancet.capture.trace import capture_forward, capture_step
from lancet.app.data import BatchSource
from lancet.graph.analysis import analyze
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.partition.rewrite import PartitionDecisions, PartitionError, Region, partition_pass
from lancet.passes.partition.select import dispatch_ranges
from lancet.plan.plan import capture_partitioned_step
from lancet.runtime.captured import CapturedStep
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

GATES = [
    GateConfig(kind="switch", dispatch="ragged"),
    GateConfig(kind="batch_prioritized", dispatch="ragged"),
    GateConfig(kind="topk", topk=2),
]
BATCH = 12  # divisible by 2, 3 and 4
# fp32; partitioned sums (expert weight gradients over parts) reassociate, hence a tolerance.
RTOL = 1e-5


def module_span(forward, prefix: str) -> tuple[str, str]:
    names = [n.name for n in forward.graph.nodes if n.meta.get("custom", {}).get("module", "").startswith(prefix)]
    return names[0], names[-1]


def attention_ranges(forward) -> list[tuple[str, str]]:
    """Around each MoE layer: from its block's attention (ln_1) to the end of the next block's attention."""
    first, _ = module_span(forward, "blocks.0.ln_1")
    _, end_one = module_span(forward, "blocks.1.attn")
    second, _ = module_span(forward, "blocks.2.ln_1")
    _, last = module_span(forward, "blocks.2")
    return [(first, end_one), (second, last)]


def _setup(group, gate):
    cfg = model_config(f"gpt2_moe_nl3_m32_nh2_sl4_b{BATCH}", vocab_size=97, gate=gate)
    step = TrainStep(build_model(cfg, group, seed=7), group, bucket_bytes=8192)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=8)
    return step, source


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _compare_rank(group, gates, part_counts) -> list[tuple]:
    rank = group.rank()
    seen = []
    for gate in gates:
        step, source = _setup(group, gate)
        batch = source.batch(0, rank)
        reference = CapturedStep(capture_step(step, *batch))
        forward = capture_forward(step, *batch)
        # Ranges into attention (each part routes its own tokens), and, for the largest n, ranges of
        # just the all-to-alls and experts (whole routing: one counts exchange per layer for all parts).
        cases = [(parts, attention_ranges(forward), 3 * parts) for parts in part_counts]
        cases.append((part_counts[-1], dispatch_ranges(forward.graph), 1 + 2 * part_counts[-1]))
        for parts, ranges, per_layer in cases:
            regions = [Region(start, end, parts) for start, end in ranges]
            partitioned = partition_pass(forward, PartitionDecisions(regions), BATCH)
            graph = capture_partitioned_step(step, partitioned, *batch)  # backward all-to-alls issued early
            dispatches = analyze(graph).collectives_of("all_to_all", "forward")
            assert len(dispatches) == 2 * per_layer  # counts, dispatch and combine of two MoE layers
            runner = CapturedStep(graph)
            for s in range(2):
                b = source.batch(s, rank)
                want, got = reference(step.parameters(), *b), runner(step.parameters(), *b)
                assert _relative(got.loss, want.loss) < RTOL
                for name, g, w in zip(step.param_names, got.grads, want.grads):
                    assert _relative(g, w) < RTOL, f"{gate.kind} n={parts}: gradient of {name}"
                for g, w in zip(got.keep, want.keep):
                    assert torch.equal(g, w), f"{gate.kind} n={parts}: dropped tokens differ"
                seen.append((gate.kind, parts, int(sum(k.sum() for k in want.keep))))
    return seen


# 2 ranks: every gate, an even and an odd part count; 4 ranks (4 processes on the CI's 2 cores): the switch
# gate (it drops tokens) in 4 parts.
@pytest.mark.parametrize("world, part_counts, gates", [(2, (2, 3), GATES), (4, (4,), GATES[:1])])
def test_partitioned_step_matches_unpartitioned(world, part_counts, gates):
    seen = run_ranks(_compare_rank, world, gates, part_counts)
    assert all(len(s) == len(gates) * (len(part_counts) + 1) * 2 for s in seen)
    # Capacity dropped tokens somewhere, so the keep comparison was meaningful.
    assert any(kept < BATCH * 4 * 2 for s in seen for kind, _, kept in s if kind == "switch")


def _refuse_half_dispatch(group):
    step, source = _setup(group, GateConfig(kind="switch"))
    forward = capture_forward(step, *source.batch(0, group.rank()))
    start, _ = module_span(forward, "blocks.0.ln_1")
    dispatch = [n.name for n in forward.graph.nodes if n.meta.get("custom", {}).get("moe_stage") == "dispatch"]
    with pytest.raises(PartitionError, match="only partly inside"):
        partition_pass(forward, PartitionDecisions([Region(start, dispatch[3], 2)]), BATCH)
    with pytest.raises(PartitionError, match="cannot be split into 5 parts"):
        partition_pass(forward, PartitionDecisions([Region(start, dispatch[-1], 5)]), BATCH)
    # Padded: parts of 12 tokens over 4 experts at capacity factor 0.25 would have no slot at all.
    step, source = _setup(group, GateConfig(kind="switch", capacity_factor=0.25))
    forward = capture_forward(step, *source.batch(0, group.rank()))
    region = Region(*module_span(forward, "blocks.0.mlp"), 4)
    with pytest.raises(PartitionError, match="capacity 0"):
        partition_pass(forward, PartitionDecisions([region]), BATCH)
    partition_pass(forward, PartitionDecisions([Region(region.start, region.end, 2)]), BATCH)
    return True


def test_bad_regions_are_refused():
    assert all(run_ranks(_refuse_half_dispatch, 2))
