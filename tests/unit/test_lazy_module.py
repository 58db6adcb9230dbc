"""Lazily generated graph modules: a rewrite only marks the code stale; a call runs the rewritten graph."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from lancet.graph.lazy_module import lazy_graph_module


def _double_plus_one(x):
    return x * 2 + 1


def test_a_rewritten_lazy_module_runs_the_rewritten_graph():
    graph = fx.symbolic_trace(_double_plus_one).graph
    gm = lazy_graph_module(nn.Module(), graph)
    x = torch.arange(4.0)
    assert torch.equal(gm(x), x * 2 + 1)
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    add.target = operator.sub  # a rewrite in place, as passes do
    gm.recompile()
    assert torch.equal(gm(x), x * 2 - 1)
    assert "mul - 1" in gm.code


def test_recompiling_a_lazy_module_generates_no_code_until_it_is_needed():
    gm = lazy_graph_module(nn.Module(), fx.symbolic_trace(_double_plus_one).graph)
    calls = []
    original = fx.Graph.python_code
    fx.Graph.python_code = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        for _ in range(5):
            gm.recompile()
        assert calls == []
        gm(torch.ones(2))
        assert len(calls) == 1
    finally:
        fx.Graph.python_code = original
