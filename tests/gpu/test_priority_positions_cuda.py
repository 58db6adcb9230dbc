"""Positions by sorted runs on the GPU, eager and compiled by Inductor, equal the stable sort's at many token counts."""

from __future__ import annotations

import pytest
import torch

from lancet.moe.gates import positions_by_argsort
from lancet.moe.priority_positions import positions_by_priority


@pytest.mark.parametrize("run_length", [512, 2048])
@pytest.mark.parametrize("tokens", [1000, 12288, 49152])
def test_positions_equal_the_sort(tokens, run_length):
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    probs_TE = torch.softmax(torch.randn(tokens, 4, device="cuda", generator=generator), dim=-1)
    prob_T, expert_T = probs_TE.max(dim=-1)
    prob_T[::5] = prob_T[1]  # ties
    want = positions_by_argsort(expert_T, prob_T, 4)
    assert torch.equal(positions_by_priority(expert_T, prob_T, 4, run_length), want)
    compiled = torch.compile(lambda e, p: positions_by_priority(e, p, 4, run_length), dynamic=False)
    assert torch.equal(compiled(expert_T, prob_T), want)
