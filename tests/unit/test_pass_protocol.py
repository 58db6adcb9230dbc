"""The pass runner: lint and recompile after each pass, the log of what changed, and the contract checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import fx

from lancet.passes.protocol import Pass, PassContractError, PassResult, run_passes


@dataclass
class _Graph:
    gm: fx.GraphModule


def _chain() -> _Graph:
    def f(x, y):
        a = torch.sin(x)
        b = torch.cos(y)
        return a + b

    return _Graph(fx.symbolic_trace(f))


def _swap_sin_cos(graph: _Graph, costs) -> PassResult:
    """Order only: move cos before sin."""
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    nodes["sin"].prepend(nodes["cos"])
    return PassResult(graph, 1)


def _add_neg(graph: _Graph, costs) -> PassResult:
    """Not order only: negate the output."""
    out = graph.gm.graph.output_node()
    with graph.gm.graph.inserting_before(out):
        neg = graph.gm.graph.call_function(torch.neg, (out.args[0],))
    out.args = (neg,)
    return PassResult(graph, "negated")


def test_runner_recompiles_logs_and_collects_decisions():
    graph, lines = _chain(), []
    x, y = torch.randn(3), torch.randn(3)
    want = torch.sin(x) + torch.cos(y)
    result = run_passes(graph, [Pass("swap", _swap_sin_cos, in_place=True, order_only=True),
                                Pass("negate", _add_neg, in_place=True, order_only=False)], log=lines.append)
    assert [n.name for n in result.graph.gm.graph.nodes][:4] == ["x", "y", "cos", "sin"]
    assert torch.equal(result.graph.gm(x, y), -want)  # recompiled after each pass
    assert result.decisions == {"swap": 1, "negate": "negated"}
    assert lines == result.log and len(lines) == 2
    assert lines[0].startswith("swap: 6 -> 6 nodes (+0 -0)") and "3 kept nodes after another node" in lines[0]
    assert lines[1].startswith("negate: 6 -> 7 nodes (+1 -0)")


def test_an_order_only_pass_that_adds_a_node_is_refused():
    with pytest.raises(PassContractError, match="order-only pass negate changed the node set"):
        run_passes(_chain(), [Pass("negate", _add_neg, in_place=True, order_only=True)])


def test_an_in_place_pass_returning_another_graph_is_refused():
    copy = lambda graph, costs: PassResult(_Graph(fx.GraphModule(graph.gm, graph.gm.graph)))  # noqa: E731
    with pytest.raises(PassContractError, match="listed in place but returned another graph"):
        run_passes(_chain(), [Pass("copy", copy, in_place=True, order_only=True)])


def test_a_pass_that_returns_no_pass_result_is_refused():
    with pytest.raises(PassContractError, match="returned tuple, not a PassResult"):
        run_passes(_chain(), [Pass("old", lambda graph, costs: (graph, None), in_place=True, order_only=True)])


def test_costs_are_priced_on_each_pass_input():
    seen = []
    run_passes(_chain(), [Pass("look", lambda graph, costs: PassResult(graph, seen.append(costs)), True, True)] * 2,
               costs=lambda g: len(g.nodes))
    assert seen == [6, 6]
