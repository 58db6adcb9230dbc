"""Plans priced for what runs: compiled regions at their measured ratio, one host call per region, none for
CUDA-graph replays; profiles from before executors still load."""

from __future__ import annotations

import json

import pytest

from lancet.cost.executor import ExecutorCostModel, ExecutorProfile, RegionTime, price_for_executor
from lancet.cost.model import ToyCostModel
from lancet.cost.profile import ComputeProfile
from tests.graphs import GraphBuilder, aten


def _graph():
    """f1 f2 | a2a | f3 f4 (forward), then b1 alone (backward; too small to compile)."""
    b = GraphBuilder()
    x, w, splits = b.input("x"), b.input("w"), [b.input("s0"), b.input("s1")]
    h = b.mm(b.mm(x, w, name="f1"), w, name="f2")
    _, wait = b.all_to_all(h, splits, "a2a")
    y = b.op(aten.relu.default, b.mm(wait, w, name="f3"), name="f4")
    b.phase = "backward"
    return b.finish(b.mm(y, w, name="b1")).graph


def _profile(kind: str) -> ExecutorProfile:
    # Region [f1, f2] ran in half its eager time; [f3, f4] in a quarter. Host: one call each.
    regions = [RegionTime(0, "forward", ["f1", "f2"], 1.0, 0.05, 2.0),
               RegionTime(2, "forward", ["f3", "f4"], 0.5, 0.03, 2.0)]
    return ExecutorProfile(kind=kind, regions=regions, issue_ms=0.2)


def _toy() -> ToyCostModel:
    return ToyCostModel(compute_ms=1.0, comm_ms={"all_to_all": 4.0})


def _with_host(costs, ms: float = 0.01):
    costs.host_ms = {name: ms for name in costs.compute_ms}
    costs.default_host_ms = ms
    costs.collective_host_ms = ms
    return costs


def test_compiled_regions_are_priced_at_their_measured_ratio_with_one_host_call():
    graph = _graph()
    priced = price_for_executor(_with_host(_toy().costs(graph)), graph, _profile("compiled"))
    assert priced.compute_ms == {"f1": 0.5, "f2": 0.5, "f3": 0.25, "f4": 0.25, "b1": 1.0}
    assert priced.host_ms == {"f1": 0.05, "f2": 0.0, "f3": 0.03, "f4": 0.0, "b1": 0.01}
    assert priced.comm_ms == {"a2a": 4.0} and priced.collective_host_ms == 0.01


class _HostPriced:
    """The toy model with a host time on every node (as GPU profiles price the host)."""

    def costs(self, graph):
        return _with_host(_toy().costs(graph))


def test_cuda_graph_replays_cost_the_host_nothing():
    graph = _graph()
    priced = ExecutorCostModel(_HostPriced(), _profile("cudagraph")).costs(graph)
    assert priced.compute_ms["f3"] == 0.25
    assert priced.host_ms and set(priced.host_ms.values()) == {0.0}
    assert priced.default_host_ms == 0.0 and priced.collective_host_ms == 0.0


def test_a_model_without_host_times_gets_none():
    graph = _graph()
    priced = price_for_executor(_toy().costs(graph), graph, _profile("compiled"))
    assert priced.host_ms == {} and priced.compute_ms["f1"] == 0.5


def test_nodes_never_profiled_take_the_ratio_of_all_compiled_regions():
    graph = _graph()
    for node in graph.nodes:
        if node.name in ("f3", "f4"):
            node.meta["custom"]["origin"] = "f1"  # copies of a profiled node (a partition pass's mark)
    profile = _profile("compiled")
    profile.regions = profile.regions[:1]
    priced = price_for_executor(_toy().costs(graph), graph, profile)
    assert priced.compute_ms["f3"] == priced.compute_ms["f4"] == 0.5
    profile.regions = [RegionTime(0, "forward", ["other"], 3.0, 0.1, 4.0)]
    assert price_for_executor(_toy().costs(graph), graph, profile).compute_ms["f1"] == pytest.approx(0.75)


def test_profiles_round_trip_and_old_profiles_load_without_executor():
    profile = ComputeProfile(fingerprint="abc", node_ms={"f1": 1.0}, node_key={"f1": "k"}, executor=_profile("cudagraph"))
    loaded = ComputeProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert loaded.executor == profile.executor
    old = profile.to_json()
    del old["executor"]
    assert ComputeProfile.from_json(old).executor is None
