"""The fused, chunked linear cross entropy: equal to the plain loss, runs under autocast, no [T, V] float32 tensor
in a captured step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lancet.app.data import BatchSource
from lancet.capture.trace import capture_step
from lancet.losses import default_chunk_tokens, linear_cross_entropy
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.step.train_step import TrainStep

N, M, V, P = 37, 16, 97, 128  # tokens, hidden, vocabulary, rows of the (padded) head weight


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, M, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(P, M, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, targets


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t())[:, :V].float(), targets)


@pytest.mark.parametrize("chunk", [None, 1, 5, 8, N])
def test_fused_loss_and_gradients_equal_the_plain_loss(chunk):
    hidden, weight, targets = _inputs()
    want = _plain(hidden, weight, targets)
    want_grads = torch.autograd.grad(3.0 * want, [hidden, weight])
    got = linear_cross_entropy(hidden, weight, targets, V, chunk)
    got_grads = torch.autograd.grad(3.0 * got, [hidden, weight])
    # fp32: the chunks sum the loss and the weight gradient in another order.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(got_grads[1][V:]) == 0  # padding rows of the table get no gradient


def test_only_the_needed_gradient_is_computed():
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight.detach(), targets, V, 8)
    (grad,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(grad, torch.autograd.grad(_plain(hidden, weight.detach(), targets), [hidden])[0])


def test_under_autocast_bf16_it_runs_and_is_close():
    hidden, weight, targets = _inputs()
    want = _plain(hidden, weight, targets)
    want_grads = torch.autograd.grad(want, [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, V, 8)
    assert got.dtype == torch.float32
    got_grads = torch.autograd.grad(got, [hidden, weight])
    assert all(g.dtype == torch.float32 for g in got_grads)
    # bf16 GEMMs: about 3 significant digits.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert ((g - w).norm() / w.norm()).item() < 2e-2


def test_bad_shapes_are_refused():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="vocab_size 200"):
        linear_cross_entropy(hidden, weight, targets, 200)
    with pytest.raises(ValueError, match="targets of shape"):
        linear_cross_entropy(hidden, weight, targets[:3], V)
    with pytest.raises(ValueError, match=r"hidden \[N, M\] and weight \[P, M\]"):
        linear_cross_entropy(hidden, weight.t(), targets, V)


def test_default_chunks_bound_the_float32_logits():
    tokens = default_chunk_tokens(48 * 512, 50304)
    assert tokens * 50304 * 4 <= 256 * 1024 * 1024 and tokens > 1000
    assert default_chunk_tokens(24, 128) == 24


def test_captured_step_holds_no_full_float32_logits():
    cfg = model_config("gpt2_moe_nl2_m16_nh2_sl8_b3", vocab_size=97, gate=GateConfig(kind="switch"),
                       loss_chunk_tokens=8)
    model = build_model(cfg, None, world_size=1)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    graph = capture_step(TrainStep(model, None), *source.batch(0, 0))
    tokens, padded_vocab = cfg.tokens_per_rank, cfg.padded_vocab_size
    shapes = []
    for node in graph.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype == torch.float32 and val.dim() >= 2:
            shapes.append(tuple(val.shape))
    assert (8, padded_vocab) in shapes  # float32 logits of one chunk of 8 tokens ...
    vocab_wide = [s for s in shapes if s[-1] in (cfg.vocab_size, padded_vocab)]
    assert not [s for s in vocab_wide if math.prod(s[:-1]) >= tokens]  # ... never of all 24


def test_the_loss_ops_have_token_axis_rules():
    from torch.fx.experimental.proxy_tensor import make_fx

    from lancet.losses import _chunk_loss_and_grads
    from lancet.passes.partition.axes import REPLICATED, TOKEN, Context, Inferred, NoRule, infer

    def chunk(hidden, weight, targets, real):
        return _chunk_loss_and_grads(hidden, weight, targets, real, 0.5, True)

    hidden, weight, targets = (t.detach() for t in _inputs())
    graph = make_fx(chunk)(hidden, weight, targets, torch.arange(P) < V)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    axes = dict(zip(placeholders, [Inferred(a) for a in (TOKEN(0), REPLICATED, TOKEN(0), REPLICATED)]))
    found = {}
    for node in graph.graph.nodes:
        if node.op == "call_function":
            try:
                axes[node] = infer(node, Context(axes, batch_size=1))
            except NoRule:  # the weight gradient contracts the tokens
                continue
            found.setdefault(str(node.target), axes[node].axis)
    assert found["aten.logsumexp.default"] == TOKEN(0)
    assert found["aten.gather.default"] == TOKEN(0)
    assert found["aten.scatter_add.default"] == TOKEN(0)


def test_the_model_loss_equals_cross_entropy_of_its_logits():
    from lancet.models import lm_loss

    cfg = model_config("gpt2_moe_nl2_m16_nh2_sl8_b3", vocab_size=97, gate=GateConfig(kind="switch"))
    model = build_model(cfg, None, world_size=1)
    tokens, targets = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size).batch(0, 0)
    out = model(tokens)
    logits = out.logits()
    assert logits.shape == (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
    plain = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), targets.reshape(-1)) + out.aux_loss
    torch.testing.assert_close(lm_loss(out, targets), plain, rtol=1e-5, atol=0)
