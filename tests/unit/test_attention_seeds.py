"""Attention backwards without dropout take a fresh host seed instead of the forward's (capture-dependent) one."""

from __future__ import annotations

import operator

import torch
from torch import fx

from lancet.capture.attention_seeds import detach_attention_seeds

aten = torch.ops.aten


def _efficient_attention_step(dropout_p: float) -> fx.GraphModule:
    """Forward and backward of memory-efficient attention as a captured step names them (built by hand: the
    ops have no CPU kernels, so nothing here runs them)."""
    graph = fx.Graph()
    q, k, v, grad = (graph.placeholder(name) for name in ("q", "k", "v", "grad"))
    forward = graph.call_function(aten._scaled_dot_product_efficient_attention.default,
                                  (q, k, v, None, True, dropout_p, True))
    out, logsumexp, seed, offset = (graph.call_function(operator.getitem, (forward, i)) for i in range(4))
    backward = graph.call_function(aten._scaled_dot_product_efficient_attention_backward.default,
                                   (grad, q, k, v, None, out, logsumexp, seed, offset, dropout_p,
                                    [True, True, True, False], True))
    grads = [graph.call_function(operator.getitem, (backward, i)) for i in range(3)]
    graph.output((out, *grads))
    return fx.GraphModule(torch.nn.Module(), graph)


def _backward(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target is aten._scaled_dot_product_efficient_attention_backward.default)


def test_backward_without_dropout_takes_fresh_host_seeds():
    gm = _efficient_attention_step(0.0)
    assert detach_attention_seeds(gm) == 2
    backward = _backward(gm)
    seed, offset = backward.args[7], backward.args[8]
    for node in (seed, offset):
        assert node.target is aten.empty.memory_format and node.kwargs["device"] == torch.device("cpu")
        assert node.kwargs["dtype"] is torch.int64
    order = list(gm.graph.nodes)
    assert order.index(seed) < order.index(backward) and order.index(seed) > order.index(backward.args[6])
    # The forward's seed and offset items had no other use and are gone; its output and logsumexp stay.
    items = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].target is not backward.target]
    assert sorted(n.args[1] for n in items) == [0, 1]


def test_backward_with_dropout_keeps_the_forwards_seeds():
    gm = _efficient_attention_step(0.1)
    before = [(n.name, n.args) for n in gm.graph.nodes]
    assert detach_attention_seeds(gm) == 0
    assert [(n.name, n.args) for n in gm.graph.nodes] == before


def test_cudnn_backward_gets_its_seed_on_the_querys_device():
    """cuDNN's backward refuses a host seed next to GPU tensors (measured on an H200, run 13)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query = torch.empty(2, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
        seed = torch.empty((), dtype=torch.int64, device="cuda")
    graph = fx.Graph()
    q, grad, out, lse, s, o = (graph.placeholder(name) for name in ("q", "grad", "out", "lse", "seed", "offset"))
    q.meta["val"], s.meta["val"], o.meta["val"] = query, seed, seed
    backward = graph.call_function(aten._scaled_dot_product_cudnn_attention_backward.default,
                                   (grad, q, q, q, out, lse, s, o, None, None, None, 8, 8, 0.0, True))
    graph.output(backward)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert detach_attention_seeds(gm) == 2
    assert {backward.args[i].kwargs["device"].type for i in (6, 7)} == {"cuda"}
