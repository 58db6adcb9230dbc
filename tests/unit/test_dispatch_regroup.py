"""Regrouping received rows by local expert without a sort equals the stable sort it replaces."""

from __future__ import annotations

import pytest
import torch

from lancet.moe.dispatch import group_by_local_expert


def _sorted_grouping(counts_WL: torch.Tensor):
    world, local = counts_WL.shape
    expert_of_received = torch.repeat_interleave(torch.arange(local).repeat(world), counts_WL.reshape(-1))
    perm = torch.argsort(expert_of_received, stable=True)
    return perm, expert_of_received[perm]


@pytest.mark.parametrize("world,local", [(1, 1), (2, 2), (4, 3)])
def test_block_regrouping_equals_the_stable_sort_by_local_expert(world, local):
    generator = torch.Generator().manual_seed(world * 10 + local)
    for _ in range(50):
        counts = torch.randint(0, 5, (world, local), generator=generator)
        counts[torch.rand(world, local, generator=generator) < 0.3] = 0  # empty blocks
        groups = group_by_local_expert(counts, int(counts.sum()))
        perm, expert_of_row = _sorted_grouping(counts)
        assert torch.equal(groups.perm_R, perm)
        assert torch.equal(groups.expert_of_row_R, expert_of_row)
        assert torch.equal(groups.offsets_L, torch.cumsum(counts.sum(0), 0).to(torch.int32))
