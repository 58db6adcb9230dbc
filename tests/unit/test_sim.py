"""Two-lane simulator on hand-built graphs with toy costs."""

from __future__ import annotations

import pytest

from lancet.cost.model import NodeCosts, ToyCostModel
from lancet.sim.simulator import _stretch, peak_live_bytes, simulate
from tests.graphs import two_layer_backward


def test_serial_order_exposes_all_to_all():
    tg = two_layer_backward()
    # order: dx1 dw1 a2a_1 | dx2 dw2 a2a_2 | out ; compute 1 ms each, a2a 4 ms
    timeline = simulate(tg.graph, ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}).costs(tg.graph))
    # dx1,dw1 [0,2]; a2a_1 [2,6]; dx2,dw2 [6,8]; a2a_2 [8,12]; out [12,13]
    assert timeline.makespan_ms == pytest.approx(13.0)
    assert timeline.comm_ms == pytest.approx(8.0)
    assert timeline.exposed_comm_ms == pytest.approx(8.0)
    assert timeline.compute_ms == pytest.approx(5.0)


def test_compute_inside_window_hides_communication():
    tg = two_layer_backward()
    nodes = {n.name: n for n in tg.graph.nodes}
    nodes["a2a_1"].append(nodes["dw1"])  # dw1 now runs while a2a_1 is in flight
    timeline = simulate(tg.graph, ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}).costs(tg.graph))
    # dx1 [0,1]; a2a_1 [1,5] with dw1 [1,2] inside; dx2,dw2 [5,7]; a2a_2 [7,11]; out [11,12]
    assert timeline.makespan_ms == pytest.approx(12.0)
    assert timeline.exposed_comm_ms == pytest.approx(7.0)


def test_contention_slows_overlapped_compute():
    assert _stretch(0.0, 2.0, [(0.0, 1.0)], 2.0) == pytest.approx(2.5)  # 0.5 ms of work in [0,1], 1.5 after
    assert _stretch(0.0, 0.25, [(0.0, 1.0)], 2.0) == pytest.approx(0.5)
    assert _stretch(2.0, 1.0, [(0.0, 1.0)], 2.0) == pytest.approx(3.0)


def test_chrome_trace_has_both_lanes():
    tg = two_layer_backward()
    trace = simulate(tg.graph, ToyCostModel().costs(tg.graph)).chrome_trace()
    lanes = {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert lanes == {0, 1}


def test_peak_live_bytes_follows_order():
    tg = two_layer_backward()
    sizes = {n.name: 10 for n in tg.graph.nodes}
    before = peak_live_bytes(tg.graph, sizes)
    nodes = {n.name: n for n in tg.graph.nodes}
    nodes["wait_a2a_2"].append(nodes["dw1"])  # dw1's output now exists for less time; nothing else changes
    assert peak_live_bytes(tg.graph, sizes) <= before
    assert NodeCosts().compute(nodes["dw1"]) == 0.0


def test_host_issue_time_and_host_sync():
    from tests.graphs import GraphBuilder
    import torch

    b = GraphBuilder()
    x = b.input("x")
    b.phase = "forward"
    a = b.op(torch.ops.aten.relu.default, x, name="a")
    c = b.op(torch.ops.aten.relu.default, a, name="c")
    tg = b.finish(c)
    costs = NodeCosts(compute_ms={"a": 1.0, "c": 1.0}, host_ms={"a": 0.1, "c": 3.0})
    # a issued at 0.1 runs [0.1, 1.1]; c issued at 3.1 runs [3.1, 4.1]: the host is the bottleneck.
    assert simulate(tg.graph, costs).makespan_ms == pytest.approx(4.1)


def test_comm_slows_down_beside_compute():
    tg = two_layer_backward()
    nodes = {n.name: n for n in tg.graph.nodes}
    nodes["a2a_1"].append(nodes["dw1"])  # 1 ms of compute inside a2a_1's 4 ms window
    costs = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}).costs(tg.graph)
    plain = simulate(tg.graph, costs)
    costs.comm_contention = 2.0
    slowed = simulate(tg.graph, costs)
    # a2a_1 shares 1 of its 4 ms: 4 * (1 + 1 * 0.25) = 5 ms; a2a_2 has nothing beside it.
    assert slowed.makespan_ms == pytest.approx(plain.makespan_ms + 1.0)


def test_collective_waits_for_the_slowest_rank():
    tg = two_layer_backward()
    # order: dx1 dw1 a2a_1 | dx2 dw2 a2a_2 | out ; rank 1's dw1 takes 3 ms instead of 1
    fast = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}).costs(tg.graph)
    slow = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}, overrides={"dw1": 3.0}).costs(tg.graph)
    alone = simulate(tg.graph, fast)
    both = NodeCosts(**{**{f: getattr(fast, f) for f in fast.__slots__}, "ranks": [fast, slow]})
    timeline = simulate(tg.graph, both)
    # a2a_1 starts when rank 1 reaches it (4 ms, not 2): every later node of rank 0 moves by 2 ms.
    assert timeline.makespan_ms == pytest.approx(alone.makespan_ms + 2.0)
    waits = [(iv.start, iv.end) for iv in timeline.intervals if iv.kind == "waiting for other ranks"]
    assert waits == [(2.0, 4.0)]  # both ranks end together; the first (rank 0) is reported, waiting for rank 1
    rank0 = NodeCosts(**{**{f: getattr(fast, f) for f in fast.__slots__}, "ranks": [fast, fast]})
    assert simulate(tg.graph, rank0).makespan_ms == pytest.approx(alone.makespan_ms)


def test_collective_takes_the_longest_rank_duration():
    tg = two_layer_backward()
    small = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0}).costs(tg.graph)
    large = ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 6.0}).costs(tg.graph)
    both = NodeCosts(**{**{f: getattr(small, f) for f in small.__slots__}, "ranks": [small, large]})
    # each of the two serial all-to-alls takes rank 1's 6 ms on both ranks
    assert simulate(tg.graph, both).makespan_ms == pytest.approx(simulate(tg.graph, small).makespan_ms + 4.0)
