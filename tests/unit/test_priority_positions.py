"""Positions by priority from sorted runs equal those of a stable descending sort, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lancet.moe import priority_positions
from lancet.moe.padded import capacity_slots
from lancet.moe.gates import positions_by_argsort
from lancet.moe.priority_positions import fits_one_key, positions_by_priority
from tests.dense_reference import python_positions

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tokens, experts, run_length", [(1, 1, 4), (7, 3, 4), (64, 4, 16), (100, 8, 7),
                                                         (333, 2, 64), (1000, 5, 1024)])
def test_equal_to_the_rule_with_ties(tokens, experts, run_length):
    generator = torch.Generator().manual_seed(tokens + experts)
    expert_T = torch.randint(0, experts, (tokens,), generator=generator)
    priority_T = torch.randint(0, 5, (tokens,), generator=generator).float() / 4  # many ties
    positions = positions_by_priority(expert_T, priority_T, experts, run_length)
    assert positions.tolist() == python_positions(expert_T.tolist(), priority_T.tolist(), experts,
                                                 "batch_prioritized")
    assert torch.equal(positions, positions_by_argsort(expert_T, priority_T, experts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_equal_to_the_stable_sort_on_odd_values(dtype):
    values = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-30, -1e-30, 0.5]
    generator = torch.Generator().manual_seed(3)
    priority_T = torch.tensor(values * 9, dtype=dtype)[torch.randperm(99, generator=generator)]
    expert_T = torch.randint(0, 3, (99,), generator=generator)
    assert torch.equal(positions_by_priority(expert_T, priority_T, 3, run_length=8),
                       positions_by_argsort(expert_T, priority_T, 3))


def test_softmax_probabilities_over_several_runs():
    generator = torch.Generator().manual_seed(1)
    probs_TE = torch.softmax(torch.randn(5000, 8, generator=generator), dim=-1)
    prob_T, expert_T = probs_TE.max(dim=-1)
    assert torch.equal(positions_by_priority(expert_T, prob_T, 8, run_length=256),
                       positions_by_argsort(expert_T, prob_T, 8))


def test_keys_that_do_not_fit_fall_back_to_the_sort(monkeypatch):
    assert fits_one_key(2**20, 2**11) and not fits_one_key(2**20 + 1, 2**11) and not fits_one_key(2**20, 2**11 + 1)
    monkeypatch.setattr(priority_positions, "fits_one_key", lambda tokens, experts: False)
    monkeypatch.setattr(torch.Tensor, "sort", None)  # the runs' sort would fail if it were reached
    expert_T = torch.tensor([1, 0, 1, 0, 1])
    priority_T = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.3])
    assert positions_by_priority(expert_T, priority_T, 2).tolist() == [2, 0, 0, 1, 1]


def test_run_length_beyond_one_block_sort_is_refused():
    with pytest.raises(ValueError, match="run_length 5000"):
        positions_by_priority(torch.zeros(3, dtype=torch.int64), torch.zeros(3), 1, run_length=5000)


def test_method_from_the_environment(monkeypatch):
    monkeypatch.delenv(priority_positions.ENV, raising=False)
    assert priority_positions.priority_positions_from_environment() == "runs"
    monkeypatch.setenv(priority_positions.ENV, "sort")
    assert priority_positions.priority_positions_from_environment() == "sort"
    monkeypatch.setenv(priority_positions.ENV, "radix")
    with pytest.raises(ValueError, match="LANCET_PRIORITY_POSITIONS must be one of runs, sort"):
        priority_positions.priority_positions_from_environment()


def test_capacity_slots_are_the_same_by_either_method(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    expert_T = torch.randint(0, 4, (3000,), generator=generator)
    priority_T = torch.randint(0, 50, (3000,), generator=generator).float() / 49
    slots = {}
    for method in priority_positions.METHODS:
        monkeypatch.setenv(priority_positions.ENV, method)
        slots[method] = capacity_slots(expert_T, priority_T, 4, 1.0)
    assert torch.equal(slots["sort"], slots["runs"]) and (slots["runs"] == -1).any()
