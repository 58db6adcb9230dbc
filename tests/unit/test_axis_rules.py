"""Token-axis rules of the ops common MoE models use: the token axis (dim 0) propagates, or the rule refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.passes.partition.axes import (
    REPLICATED, TOKEN, Context, Inferred, NoRule, axis_rule, infer, register_axis_rule,
)

B, S, M = 4, 3, 8


def _output_axis(fn, tokens: torch.Tensor, *whole: torch.Tensor):
    """Trace ``fn(tokens, *whole)``; infer axes with ``tokens`` on TOKEN(0); the output's Inferred."""
    gm = make_fx(fn)(tokens, *whole)
    axes: dict = {}
    ctx = Context(axes, batch_size=B)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        axes[node] = Inferred(TOKEN(0) if i == 0 else REPLICATED)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            axes[node] = infer(node, ctx)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    return axes[out[0] if isinstance(out, (list, tuple)) else out]


def _rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def _rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[torch.arange(S)] + rotated * sin[torch.arange(S)]


def _topk_renormalised(x, router):
    weights, experts = torch.topk(torch.softmax(x @ router, dim=-1), 2, dim=-1)
    return weights / weights.sum(-1, keepdim=True) + experts


def _sigmoid_gate_with_shared_expert(x, router, w):
    return torch.sigmoid(x @ router).max(-1, keepdim=True).values * (x @ w) + F.silu(x @ w)


def _capacity_gate(x, router):
    expert = torch.argmax(x @ router, dim=-1)
    return torch.cumsum((expert[:, None] == torch.arange(4)).long(), dim=0)


W = torch.randn(M, M)
CASES = {
    "rms_norm as traced": (_rms_norm, torch.randn(B * S, M), torch.randn(M)),
    "F.rms_norm (an in-place add on a temporary)": (lambda x, w: F.rms_norm(x, [M], w, 1e-6), torch.randn(B, S, M),
                                                    torch.randn(M)),
    "swiglu": (_swiglu, torch.randn(B * S, M), W, W, W),
    "rotary": (_rotary, torch.randn(B, 2, S, M), torch.randn(S, M), torch.randn(S, M)),
    "topk renormalised": (_topk_renormalised, torch.randn(B * S, M), torch.randn(M, 4)),
    "sigmoid gate + shared expert": (_sigmoid_gate_with_shared_expert, torch.randn(B * S, M), torch.randn(M, 4), W),
    "repeat of kv heads": (lambda x: x[:, :, None].expand(B, 2, 2, S, M).reshape(B, 4, S, M).repeat(1, 1, 2, 1),
                           torch.randn(B, 2, S, M)),
    "repeat_interleave of heads": (lambda x: x.repeat_interleave(2, dim=1), torch.randn(B, 2, S, M)),
    "causal mask": (lambda x: torch.tril(x), torch.randn(B, 2, S, S)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_token_axis_propagates_part_exactly(name):
    fn, *args = CASES[name]
    found = _output_axis(fn, *args)
    assert found.axis == TOKEN(0) and found.exact


def test_cumsum_over_tokens_of_a_capacity_gate_carries():
    found = _output_axis(_capacity_gate, torch.randn(B * S, M), torch.randn(M, 4))
    assert found.axis == TOKEN(0) and found.carry


def _mutates_a_shared_value(x):
    y = x.clone()
    z = y * 2
    y.add_(1)
    return z + y


REFUSED = {
    "repeat along tokens": (lambda x: x.repeat(2, 1), torch.randn(B * S, M)),
    "in-place op on a value others read": (_mutates_a_shared_value, torch.randn(B * S, M)),
    "triangle over tokens": (lambda x: torch.tril(x), torch.randn(B * S, M)),
    "topk over tokens": (lambda x: torch.topk(x, 2, dim=0).values, torch.randn(B * S, M)),
}


def _single_op_axis(op, shapes, *rest):
    """Infer the axis of ``op(placeholders..., *rest)`` in a hand-built graph (input 0 on TOKEN(0))."""
    graph = fx.Graph()
    inputs = []
    for i, shape in enumerate(shapes):
        node = graph.placeholder(f"in{i}")
        node.meta["val"] = torch.empty(shape)
        inputs.append(node)
    node = graph.call_function(op, (inputs[0], *rest[:1], *inputs[1:], *rest[1:]))
    node.meta["val"] = op(*[torch.empty(sh) for sh in shapes[:1]], *rest[:1], *[torch.empty(sh) for sh in shapes[1:]],
                          *rest[1:])
    axes = {n: Inferred(TOKEN(0) if i == 0 else REPLICATED) for i, n in enumerate(inputs)}
    return infer(node, Context(axes, batch_size=B))


def test_rms_norm_as_one_op_follows_its_input_and_refuses_the_token_dim():
    rms_norm, fused = torch.ops.aten.rms_norm.default, torch.ops.aten._fused_rms_norm.default
    assert _single_op_axis(rms_norm, [(B * S, M), (M,)], [M], 1e-6).axis == TOKEN(0)
    assert _single_op_axis(fused, [(B * S, M), (M,)], [M], 1e-6).axis == (TOKEN(0), TOKEN(0))
    with pytest.raises(NoRule):
        _single_op_axis(rms_norm, [(B * S, M), (B * S, M)], [B * S, M], 1e-6)


@pytest.mark.parametrize("name", list(REFUSED))
def test_ops_that_mix_tokens_are_refused(name):
    fn, *args = REFUSED[name]
    with pytest.raises(NoRule):
        _output_axis(fn, *args)


def test_users_register_rules_for_their_own_ops():
    lib = torch.library.Library("lancet_axis_test", "FRAGMENT")
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x * 2, "CompositeExplicitAutograd")
    op = torch.ops.lancet_axis_test.scale
    with pytest.raises(NoRule, match="no rule"):
        _output_axis(lambda x: op(x), torch.randn(B, M))

    @register_axis_rule(op)
    def _scale(node, ctx):
        return Inferred(ctx.axis(node.args[0]))

    assert axis_rule(op.default) is _scale
    assert _output_axis(lambda x: op(x), torch.randn(B, M)).axis == TOKEN(0)
