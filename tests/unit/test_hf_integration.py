"""HF integration in one process: unknown block classes are refused, checkpoints load, router variants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lancet.integrations.hf import CausalLM, UnsupportedMoEBlock, hf_parameter, make_expert_parallel
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


@pytest.mark.parametrize("name", ["mixtral-tiny", "qwen3-moe-tiny", "qwen2-moe-tiny", "olmoe-tiny"])
def test_the_class_router_loss_is_reproduced_and_captures(name):
    import torch.nn.functional as F

    from lancet.capture.trace import capture_step
    from lancet.runtime.captured import CapturedStep
    from lancet.step.train_step import TrainStep

    model = load_causal_lm(name, seed=3)
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.25
    reference = copy.deepcopy(model)
    lm = CausalLM(make_expert_parallel(model, None))
    assert lm.router_aux_loss_coef == 0.25
    tokens, targets = torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        out = reference(input_ids=tokens, output_router_logits=True)
        want = F.cross_entropy(out.logits.reshape(-1, 128), targets.reshape(-1)) + 0.25 * out.aux_loss
        got = lm.loss(lm(tokens), targets)
    assert out.aux_loss > 0 and abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())
    step = TrainStep(lm, None)
    eager = step(step.parameters(), tokens, targets)
    out = reference(input_ids=tokens, output_router_logits=True)
    (F.cross_entropy(out.logits.reshape(-1, 128), targets.reshape(-1)) + 0.25 * out.aux_loss).backward()
    reference_grads = dict(reference.named_parameters())
    for param_name, grad in zip(step.param_names, eager.grads):  # the router's gradients hold the aux loss's
        ref_name, shard = hf_parameter(param_name)
        want_grad = reference_grads[ref_name].grad
        want_grad = want_grad.transpose(1, 2) if shard else want_grad
        assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-6), param_name
    captured = CapturedStep(capture_step(step, tokens, targets))(step.parameters(), tokens, targets)
    assert torch.equal(captured.loss, eager.loss) and all(torch.equal(a, b) for a, b in zip(captured.grads, eager.grads))
