"""The long-run equivalence check, short: eager, captured, dW plan and partition plan on the byte corpus.

The long version (200 steps) runs outside CI: ``python -m lancet.app.equivalence --steps 200`` (docs/results.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lancet.app.config import ModelSpec, RunConfig
from lancet.app.equivalence import compare, train_variants
from lancet.runtime.dist import Runtime
from tests.distributed import run_ranks

STEPS = 6
PARTITION_RTOL = 1e-5
"""Partitioned expert weight gradients sum over parts in another order: float reassociation, fp32."""


def _variants(group):
    runtime = Runtime(group=group, rank=dist.get_rank(group), world_size=dist.get_world_size(group),
                      device=torch.device("cpu"))
    run = RunConfig(spec=ModelSpec(model="tiny", dispatch="ragged"), steps=STEPS, data="stdlib")
    return train_variants(run, runtime, STEPS, parts=2)


def test_plans_train_like_the_captured_step():
    result = run_ranks(_variants, 2)[0]
    assert result["dw_nodes_moved"] > 0 and result["partition_regions"]
    report = compare(result["curves"])
    assert report["captured"]["bitwise"] and report["dw"]["bitwise"]
    assert report["partition"]["max_rel_loss_diff"] <= PARTITION_RTOL
    assert report["partition"]["dropped_differ_steps"] == 0
    assert all(len(c["loss"]) == STEPS for c in result["curves"].values())
