"""HF integration in one process: unknown block classes are refused, checkpoints load, router variants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lancet.integrations.hf import CausalLM, UnsupportedMoEBlock, make_expert_parallel
from lancet.integrations.hf_models import hf_model_config, load_causal_lm
from lancet.moe.gates import GateConfig, route, topk_keep


class DeepMoE(nn.Module):
    """A block of an unknown class: an ``experts`` child, no router called ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4)])
        self.router = nn.Linear(4, 1)


def test_unknown_block_class_is_named_with_what_is_missing():
    model = nn.Sequential(nn.Linear(4, 4), DeepMoE())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedMoEBlock, match=r"1: sparse MoE block class DeepMoE is not supported .*no a 'gate' "
                                                  r"submodule, experts.gate_up_proj, experts.down_proj"):
        make_expert_parallel(model, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing replaced
    with pytest.raises(UnsupportedMoEBlock, match="has no sparse MoE block"):
        make_expert_parallel(nn.Linear(2, 2), None)


def test_checkpoint_directory_keeps_its_behaviour(tmp_path):
    original = load_causal_lm("olmoe-tiny", seed=5)
    original.save_pretrained(tmp_path)
    tokens = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        want = original(input_ids=tokens).logits
        got = hf_model_config(str(tmp_path)).build(None, seed=99)(tokens).logits()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown HF model 'no-such-model'"):
        hf_model_config("no-such-model")


def test_capacity_factor_drops_later_choices_first():
    expert_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = topk_keep(expert_TK, num_experts=4, cap=2)
    # Expert 0: first choices of tokens 0 and 1 are kept, token 2's and token 3's second choice dropped.
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    model = make_expert_parallel(load_causal_lm("mixtral-tiny", seed=1), None, capacity_factor=0.5)
    out = CausalLM(model)(torch.randint(0, 128, (2, 8)))
    assert all(0 < int(k.sum()) < k.numel() for k in out.keep)


def test_topk_then_softmax_router():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    routing = route(logits, GateConfig(kind="topk", topk=2, router="topk_softmax"))
    assert routing.expert_TK.tolist() == [[1, 2]]
    torch.testing.assert_close(routing.weight_TK, torch.softmax(torch.tensor([[3.0, 2.0]]), dim=-1))
