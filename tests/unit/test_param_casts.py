"""Autocast's casts of parameters become one foreach copy after the inputs; the step's values stay bitwise."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx

from lancet.app.data import BatchSource
from lancet.capture.param_casts import batch_parameter_casts
from lancet.capture.trace import capture_step
from lancet.graph import meta
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.runtime.captured import CapturedStep
from lancet.step.train_step import TrainStep

aten = torch.ops.aten


def _bf16_step(layers: int = 2):
    cfg = model_config(f"gpt2_moe_nl{layers}_m16_nh2_sl8_b2", vocab_size=97, gate=GateConfig(kind="switch"))
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg, None, world_size=1), None, autocast_dtype=torch.bfloat16)
    return step, BatchSource(batch_size=2, seq_len=8, vocab_size=97, seed=1).batch(0, 0)


def _param_casts(graph: fx.Graph, num_params: int) -> list[fx.Node]:
    params = [n for n in graph.nodes if n.op == "placeholder"][:num_params]
    return [u for p in params for u in p.users if u.target is aten._to_copy.default]


def test_captured_bf16_step_casts_its_parameters_once_and_equals_eager_bitwise():
    step, batch = _bf16_step()
    graph = capture_step(step, *batch)
    nodes = list(graph.graph.nodes)
    foreach = [n for n in nodes if n.target is aten._foreach_copy.default]
    assert len(foreach) == 1 and not _param_casts(graph.graph, graph.num_params)
    # Two blocks: qkv, proj (weight, bias) each, an MLP or experts, the router: at least 16 parameters cast.
    assert len(foreach[0].args[1]) >= 16 and all(a.op == "placeholder" for a in foreach[0].args[1])
    first_compute = next(n for n in nodes if n.op == "call_function" and n.target is not aten.empty.memory_format)
    assert first_compute is foreach[0]  # before any other work of the step
    params = step.parameters()
    want, got = step(params, *batch), CapturedStep(graph)(params, *batch)
    assert torch.equal(got.loss, want.loss)
    for g, w in zip(got.grads, want.grads):
        assert torch.equal(g, w)


def _graph_with_casts() -> fx.GraphModule:
    graph = fx.Graph()
    w, b, v, x = (graph.placeholder(name) for name in ("w", "b", "v", "x"))
    casts = [graph.call_function(aten._to_copy.default, (p,), {"dtype": torch.bfloat16}) for p in (w, b)]
    y = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (x, casts[0])), casts[1]))
    graph.output((graph.call_function(aten.add.Tensor, (y, v)),))
    values = {"w": torch.ones(3), "b": torch.ones(3), "v": torch.ones(3), "x": torch.ones(3, dtype=torch.bfloat16)}
    for node in graph.nodes:
        if node.op != "output":
            meta.update(node, **{meta.PHASE: meta.FORWARD})
        if node.op == "placeholder":
            node.meta["val"] = values[node.name]
        elif node.target is aten._to_copy.default:
            node.meta["val"] = torch.ones(3, dtype=torch.bfloat16)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_only_parameter_casts_with_a_dtype_are_batched():
    gm = _graph_with_casts()
    inputs = [torch.tensor([1.0001, 2.5, -3.3]), torch.tensor([0.1, 0.2, 0.3]), torch.ones(3),
              torch.tensor([1.0, 2.0, 3.0]).to(torch.bfloat16)]
    want = gm(*inputs)
    assert batch_parameter_casts(gm, num_params=3) == 2
    assert torch.equal(gm(*inputs)[0], want[0])
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert [n.args[1] for n in getitems] == [0, 1]
    assert batch_parameter_casts(gm, num_params=3) == 0  # nothing left to batch


def test_fewer_than_two_casts_leave_the_graph_alone():
    gm = _graph_with_casts()
    before = [n.format_node() for n in gm.graph.nodes]
    assert batch_parameter_casts(gm, num_params=1) == 0  # only w counts as a parameter
    assert [n.format_node() for n in gm.graph.nodes] == before


@pytest.mark.parametrize("kwargs", [{"dtype": torch.bfloat16, "device": torch.device("cpu")}, {}])
def test_casts_with_more_than_a_dtype_are_left_alone(kwargs):
    graph = fx.Graph()
    params = [graph.placeholder(f"p{i}") for i in range(2)]
    casts = [graph.call_function(aten._to_copy.default, (p,), dict(kwargs)) for p in params]
    graph.output(tuple(casts))
    for node in graph.nodes:
        meta.update(node, **{meta.PHASE: meta.FORWARD})
        node.meta["val"] = torch.ones(2)
    assert batch_parameter_casts(fx.GraphModule(torch.nn.Module(), graph), num_params=2) == 0


def test_a_parameter_cast_twice_is_copied_once():
    graph = fx.Graph()
    w, b = graph.placeholder("w"), graph.placeholder("b")
    casts = [graph.call_function(aten._to_copy.default, (p,), {"dtype": torch.bfloat16}) for p in (w, b, w)]
    graph.output((graph.call_function(aten.add.Tensor, (casts[0], casts[2])), casts[1]))
    for node in graph.nodes:
        meta.update(node, **{meta.PHASE: meta.FORWARD})
        node.meta["val"] = torch.ones(2)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    inputs = [torch.tensor([1.0001, -2.7]), torch.tensor([0.3, 0.7])]
    want = gm(*inputs)
    assert batch_parameter_casts(gm, num_params=2) == 3
    foreach = next(n for n in gm.graph.nodes if n.target is aten._foreach_copy.default)
    assert [a.name for a in foreach.args[1]] == ["w", "b"]
    assert all(torch.equal(g, w) for g, w in zip(gm(*inputs), want))
