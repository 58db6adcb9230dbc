"""Host issue time: measured for the whole graph, spread over the per-node host times the simulator charges."""

from __future__ import annotations

import time

import pytest
import torch
from torch import fx

from lancet.cost.comm import CommProfile
from lancet.cost.model import ProfiledCostModel, host_scale
from lancet.cost.profile import ComputeProfile, measure_issue_ms
from lancet.moe import host_copy
from lancet.sim.simulator import simulate
from tests.graphs import GraphBuilder


def _graph_with_collective():
    b = GraphBuilder()
    x = b.input("x")
    b.phase = "forward"
    a = b.op(torch.ops.aten.relu.default, x, name="a")
    _, waited = b.all_reduce(a, name="ar")
    c = b.op(torch.ops.aten.relu.default, waited, name="c")
    return b.finish(c).graph


def _profile(issue_ms: float) -> ComputeProfile:
    return ComputeProfile(fingerprint="toy", node_ms={"a": 1.0, "c": 1.0}, host_ms={"a": 0.5, "c": 1.5},
                          comm_bytes={"ar": 4}, comm_kind={"ar": "all_reduce"}, comm_ms={"ar": 1.0},
                          issue_ms=issue_ms)


def test_scale_makes_simulated_host_time_match_the_measured_issue_time():
    graph, comm = _graph_with_collective(), CommProfile(issue_ms=1.0)
    # Charged per node: a 0.5 + c 1.5 = 2.0 (a collective's wait costs the host nothing); the
    # collective's issue time, 1.0, comes off the measured 9.0: (9 - 1) / 2 = 4.
    assert host_scale(_profile(9.0), comm, graph) == pytest.approx(4.0)
    assert host_scale(_profile(5.0), comm, graph) == pytest.approx(2.0)
    assert host_scale(_profile(0.0), comm, graph) == 1.0  # profiles made before the measurement
    assert host_scale(_profile(100.0), comm, graph) == 4.0  # kept within [0.25, 4]
    assert host_scale(_profile(1.1), comm, graph) == 0.25


def test_scaled_host_times_reach_the_simulator():
    graph, comm = _graph_with_collective(), CommProfile(issue_ms=1.0)
    unscaled = ProfiledCostModel(_profile(0.0), comm).costs(graph)
    scaled = ProfiledCostModel(_profile(5.0), comm).costs(graph)
    assert scaled.host_ms == {"a": 1.0, "c": 3.0} and unscaled.host_ms == {"a": 0.5, "c": 1.5}
    # The host issues a (1 ms), the all-reduce (1 ms), c (3 ms); c then runs 1 ms: 6 ms, host-bound.
    assert simulate(graph, scaled).makespan_ms == pytest.approx(6.0)
    assert simulate(graph, scaled).makespan_ms > simulate(graph, unscaled).makespan_ms


def _blocking_wait(x: torch.Tensor) -> torch.Tensor:
    """Stands for a host wait that blocks 50 ms."""
    time.sleep(0.05)
    host_copy._blocked[0] += 0.05
    return x


def test_issue_time_leaves_out_time_blocked_in_host_waits():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.relu, (x,))
    graph.output(graph.call_function(_blocking_wait, (y,)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    issue = measure_issue_ms(gm, [torch.ones(4)], torch.device("cpu"), runs=2)
    assert 0.0 < issue < 25.0


def test_issue_time_survives_the_profile_file():
    profile = _profile(7.5)
    assert ComputeProfile.from_json(profile.to_json()).issue_ms == 7.5
