"""Merging the parts' split-size exchanges: one per layer where routing is whole, order kept otherwise."""

from __future__ import annotations

import operator

import pytest
from torch import fx

from lancet.capture.trace import capture_forward
from lancet.app.data import BatchSource
from lancet.graph.reorder import stable_topological_order
from lancet.graph.roles import collective_kind, is_irregular_all_to_all
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.plan.optimize import fake_process_group
from lancet.passes.partition.rewrite import PartitionDecisions, Region, partition_pass
from lancet.passes.partition.select import dispatch_ranges
from lancet.step.train_step import TrainStep
from tests.multirank.test_pass_partition import BATCH, attention_ranges

LAYERS = 2  # MoE layers of gpt2_moe_nl3 (blocks 0 and 2)


def _partitioned(kind: str, parts: int, gate: str = "switch"):
    with fake_process_group(2) as group:
        cfg = model_config(f"gpt2_moe_nl3_m32_nh2_sl4_b{BATCH}", vocab_size=97, gate=GateConfig(kind=gate, dispatch="ragged"))
        step = TrainStep(build_model(cfg, group, seed=7), group)
        source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=8)
        forward = capture_forward(step, *source.batch(0, 0))
        ranges = dispatch_ranges(forward.graph) if kind == "dispatch" else attention_ranges(forward)
        return partition_pass(forward, PartitionDecisions([Region(s, e, parts) for s, e in ranges]), BATCH).graph


def _count_exchanges(graph):
    return [n for n in graph.nodes if collective_kind(n) == "all_to_all" and not is_irregular_all_to_all(n)]


def _targets(graph, name):
    return [n for n in graph.nodes if str(n.target) == name]


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("gate", ["switch", "batch_prioritized"])
def test_whole_routing_gets_one_counts_exchange_and_one_host_wait_per_layer(parts, gate):
    graph = _partitioned("dispatch", parts, gate)
    order = {n: i for i, n in enumerate(graph.nodes)}
    exchanges = _count_exchanges(graph)
    copies, waits = _targets(graph, "lancet.to_host.default"), _targets(graph, "lancet.host_wait.default")
    assert len(exchanges) == len(copies) == len(waits) == LAYERS
    token_exchanges = [n for n in graph.nodes if is_irregular_all_to_all(n)]
    assert len(token_exchanges) == LAYERS * 2 * parts
    for exchange, copy, wait in zip(exchanges, copies, waits):
        assert order[exchange] < order[copy] < order[wait]
        # The merged exchange carries every part's counts (2 experts per rank, 2 ranks); the host
        # waits before any part's token exchange of the layer.
        assert exchange.args[1] == exchange.args[2] == [2 * parts, 2 * parts]
        layer_tokens = [t for t in token_exchanges if order[copy] < order[t]][: 2 * parts]
        assert all(order[wait] < order[t] for t in layer_tokens)


def test_parts_with_their_own_routing_keep_their_own_exchanges():
    graph = _partitioned("attention", 2)
    assert len(_count_exchanges(graph)) == LAYERS * 2
    assert len(_targets(graph, "lancet.host_wait.default")) == LAYERS * 2


def test_stable_topological_order_moves_only_what_must_move():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(operator.neg, (x,))
    b = graph.call_function(operator.abs, (x,))
    late = graph.call_function(operator.pos, (x,))
    with graph.inserting_before(a):
        early = graph.call_function(operator.mul, (b, late))  # placed before both of its inputs
    c = graph.call_function(operator.add, (a, early))
    graph.output(c)
    assert list(graph.nodes)[1] is early
    # Nodes keep their order; ``early`` moves to just after its last input.
    assert stable_topological_order(graph) == [x, a, b, late, early, c, list(graph.nodes)[-1]]
