"""dW scheduling pass: order properties on hand-built graphs, bitwise gradients on the real model."""

from __future__ import annotations

import pytest

import torch

from lancet.capture.trace import capture_step
from lancet.cost.model import ToyCostModel
from lancet.app.data import BatchSource
from lancet.graph.analysis import analyze
from lancet.graph.reorder import check_order
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.allreduce_gaps import allreduce_gaps_pass
from lancet.passes.dw import dw_pass
from lancet.runtime.captured import CapturedStep
from lancet.sim.simulator import simulate
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks
from tests.graphs import two_layer_backward

TOY = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0, "all_reduce": 2.0})


def _positions(tg):
    return {n.name: i for i, n in enumerate(tg.graph.nodes)}


def test_dw_lands_inside_the_window_it_was_assigned():
    tg = two_layer_backward()
    _, decisions = dw_pass(tg, TOY.costs(tg.graph))
    pos = _positions(tg)
    assert decisions.windows == {"a2a_1": ["dw1"], "a2a_2": ["dw2"]}
    for a2a, names in decisions.windows.items():
        for name in names:
            assert pos[a2a] < pos[name] < pos[f"wait_{a2a}"]
    check_order(tg.graph, list(tg.graph.nodes))


def test_dw_pass_shortens_the_simulated_step():
    tg = two_layer_backward()
    before = simulate(tg.graph, TOY.costs(tg.graph))
    dw_pass(tg, TOY.costs(tg.graph))
    after = simulate(tg.graph, TOY.costs(tg.graph))
    assert after.makespan_ms < before.makespan_ms
    assert after.exposed_a2a_ms < before.exposed_a2a_ms


def test_best_fit_stops_on_overshoot():
    tg = two_layer_backward()
    # dw1 costs 10 ms: more than twice a 4 ms window, but it is the first pick so it is taken;
    # dw2 (1 ms) then has nowhere else to go but a2a_2.
    costs = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}, overrides={"dw1": 10.0}).costs(tg.graph)
    _, decisions = dw_pass(tg, costs, force_last_chance=False)
    assert decisions.windows["a2a_1"] == ["dw1"]


def test_memory_cap_zero_moves_nothing():
    tg = two_layer_backward()
    order = [n.name for n in tg.graph.nodes]
    costs = ToyCostModel(bytes_per_node=1000).costs(tg.graph)
    _, decisions = dw_pass(tg, costs, memory_cap_bytes=0)
    assert decisions.num_moved == 0
    assert [n.name for n in tg.graph.nodes] == order


def test_memory_cap_is_respected():
    tg = two_layer_backward()
    costs = ToyCostModel(bytes_per_node=1000).costs(tg.graph)
    _, unlimited = dw_pass(two_layer_backward(), costs)
    assert unlimited.extra_bytes_peak > 0
    cap = unlimited.extra_bytes_peak - 1
    _, capped = dw_pass(tg, costs, memory_cap_bytes=cap)
    assert capped.extra_bytes_peak <= cap
    assert capped.num_moved < unlimited.num_moved


GATES = [  # the padded dispatch (switch) and the ragged one (the others)
    GateConfig(kind="switch"),
    GateConfig(kind="batch_prioritized", dispatch="ragged"),
    GateConfig(kind="topk", topk=2),
]


def _dw_bitwise_rank(group, gates) -> list[list[str]]:
    rank = group.rank()
    orders = []
    for gate in gates:
        cfg = model_config("gpt2_moe_nl4_m32_nh2_sl8_b3", vocab_size=97, gate=gate)
        model = build_model(cfg, group, seed=4)
        step = TrainStep(model, group, bucket_bytes=8192)
        source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=6)
        reference = CapturedStep(capture_step(step, *source.batch(0, rank)))
        scheduled_graph = capture_step(step, *source.batch(0, rank))
        costs = ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5, "all_reduce": 0.2}).costs(scheduled_graph.graph)
        _, decisions = dw_pass(scheduled_graph, costs)
        assert decisions.num_moved > 0
        if gate.padded:  # the experts' weight-gradient bmm nodes are among the moved ones
            targets = {n.name: n.target for n in scheduled_graph.graph.nodes}
            moved = [targets[name] for names in decisions.windows.values() for name in names]
            assert torch.ops.aten.bmm.default in moved
        _, ar_decisions = allreduce_gaps_pass(scheduled_graph, costs)
        assert ar_decisions.after
        scheduled = CapturedStep(scheduled_graph)
        params = step.parameters()
        for s in range(3):
            batch = source.batch(s, rank)
            want, got = reference(params, *batch), scheduled(params, *batch)
            assert torch.equal(want.loss, got.loss)
            for name, w, g in zip(step.param_names, want.grads, got.grads):
                assert torch.equal(w, g), f"{gate.kind}: gradient of {name} differs after dW scheduling"
        orders.append([c.start.name for c in analyze(scheduled_graph).collectives])
    return orders


@pytest.mark.multirank
def test_dw_scheduled_graph_is_bitwise_equal_and_collective_order_agrees():
    per_rank = run_ranks(_dw_bitwise_rank, 2, GATES)
    assert per_rank[0] == per_rank[1]


def test_allreduce_moves_into_the_gap_between_all_to_alls():
    from lancet.passes.allreduce_gaps import allreduce_gaps_pass
    from tests.graphs import backward_with_allreduce

    tg = backward_with_allreduce()
    costs = TOY.costs(tg.graph)  # gap between a2a_1 and a2a_2: dx2..dx4 = 3 ms; all-reduce 2 ms
    before = simulate(tg.graph, costs)
    _, decisions = allreduce_gaps_pass(tg, costs)
    pos = _positions(tg)
    assert decisions.after == {"a2a_1": ["allreduce"]}
    assert pos["a2a_1"] < pos["flat"] < pos["allreduce"] < pos["a2a_2"]
    assert pos["wait_allreduce"] > pos["out"]  # the wait stays at the end
    assert simulate(tg.graph, costs).makespan_ms < before.makespan_ms
