"""All-to-all pricing by the bytes that cross a rank's link."""

from __future__ import annotations

import pytest

from lancet.cost.comm import CommProfile, PiecewiseLinear


def comm(shared: float | None) -> CommProfile:
    return CommProfile(curves={"all_to_all": PiecewiseLinear([(0.0, 0.0), (1000.0, 10.0)])}, shared_directions=shared)


@pytest.mark.parametrize("shared", [0.0, 0.5, 1.0])
def test_even_all_to_all_costs_what_the_curve_says(shared):
    world, per_rank = 4, 800.0
    off = per_rank * (world - 1) / world
    assert comm(shared).all_to_all_ms(off, off, world) == pytest.approx(8.0)


def test_one_way_traffic_costs_half_on_a_shared_link_and_the_same_on_a_duplex_one():
    world, off = 2, 400.0  # the even all-to-all of 800 bytes per rank moves 400 off-rank each way
    assert comm(0.0).all_to_all_ms(off, 0.0, world) == pytest.approx(8.0)
    assert comm(1.0).all_to_all_ms(off, 0.0, world) == pytest.approx(4.0)
    assert comm(None).all_to_all_ms(off, 0.0, world) is None  # not measured: priced by bytes received


def test_measured_collectives_price_the_graph_and_scale_the_curve_for_new_ones():
    from lancet.cost.estimate import comm_scale
    from lancet.cost.model import ProfiledCostModel
    from lancet.cost.profile import ComputeProfile
    from tests.graphs import two_layer_backward

    tg = two_layer_backward()
    curve = comm(None)  # 10 ms per 1000 bytes
    profile = ComputeProfile(
        fingerprint="",
        comm_bytes={"a2a_1": 400, "a2a_2": 800},
        comm_kind={"a2a_1": "all_to_all", "a2a_2": "all_to_all"},
        comm_ms={"a2a_1": 2.0, "a2a_2": 4.0},  # measured: half of what the curve says
    )
    costs = ProfiledCostModel(profile, curve, model_host=False).costs(tg.graph)
    nodes = {n.name: n for n in tg.graph.nodes}
    assert costs.comm(nodes["a2a_1"]) == 2.0 and costs.comm(nodes["a2a_2"]) == 4.0
    assert comm_scale(profile, curve) == {"all_to_all": pytest.approx(0.5)}


def test_collective_times_measured_under_another_network_are_not_used():
    from lancet.plan.artifact import RunIdentity
    from lancet.cost.model import ProfiledCostModel
    from lancet.cost.profile import ComputeProfile, RankCosts
    from lancet.plan.optimize import profile_for_network
    from tests.graphs import two_layer_backward

    measured = {"a2a_1": 2.0, "a2a_2": 4.0}
    profile = ComputeProfile(
        fingerprint="", comm_bytes={"a2a_1": 400, "a2a_2": 800},
        comm_kind={"a2a_1": "all_to_all", "a2a_2": "all_to_all"}, comm_ms=dict(measured),
        ranks=[RankCosts(comm_bytes={"a2a_1": 400, "a2a_2": 800}, comm_ms=dict(measured))],
    )
    identity = RunIdentity(model="m", gate="switch", world_size=2, dtype="bf16", device="cuda:H200",
                           network="native", torch_version="2.11.0")
    doc = {"identity": identity.to_json(), "profile": profile.to_json()}
    tg = two_layer_backward()
    nodes = {n.name: n for n in tg.graph.nodes}
    for network, expected in (("native", measured), ("ib100", {"a2a_1": 4.0, "a2a_2": 8.0})):  # curve: 10 ms/1000 B
        costs = ProfiledCostModel(profile_for_network(doc, network), comm(None), model_host=False).costs(tg.graph)
        assert {n: costs.comm(nodes[n]) for n in expected} == pytest.approx(expected)
        assert {n: costs.ranks[0].comm(nodes[n]) for n in expected} == pytest.approx(expected)
