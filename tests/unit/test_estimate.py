"""Pricing nodes the profile never timed: interpolation by work, bandwidth beyond, part counts of sizes."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.cost.estimate import Sizes, _Rate


def test_work_between_profiled_sizes_is_interpolated_not_priced_at_the_small_rate():
    rate = _Rate.of([(10.0, 0.005), (1000.0, 0.010), (1000.0, 0.012)], bandwidth_rate=1e-5)
    assert rate.samples == [(10.0, 0.005), (1000.0, 0.011)]  # median per distinct size
    assert rate.ms(505.0) == pytest.approx(0.008)
    assert rate.ms(1.0) == pytest.approx(0.005)  # never below the fastest kernel
    assert rate.ms(2000.0) == pytest.approx(0.022)  # just beyond the largest: its rate


def test_memory_bound_work_far_beyond_the_profile_is_priced_at_the_bandwidth():
    tiny_only = _Rate.of([(32.0, 0.005)], bandwidth_rate=1e-6)  # e.g. a cumsum over a handful of counts
    assert tiny_only.ms(1e8) == pytest.approx(100.0)  # 1e8 bytes at the bandwidth, not 1e8 * 0.005 / 32
    flops = _Rate.of([(1e9, 1.0)], bandwidth_rate=None)  # matrix products keep their own rate
    assert flops.ms(1e10) == pytest.approx(10.0)


def test_a_size_keeps_the_part_count_of_the_forward_node_that_made_it():
    def f(counts, x):
        n = counts[0].item()
        torch._check(n >= 0)
        torch._check(n <= x.shape[0])
        return x[:n] * 2

    gm = make_fx(f, tracing_mode="fake")(torch.tensor([3]), torch.randn(8, 4))
    made = next(n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.SymInt))
    made.meta.setdefault("custom", {})["parts"] = 2
    later = gm.graph.call_function(torch.ops.aten.sym_size.int, (next(iter(made.users)), 0))
    later.meta["val"] = made.meta["val"]  # a backward use without part marks
    later.meta["custom"] = {"phase": "backward"}
    sizes = Sizes(gm.graph, rows_per_size=100.0)
    assert sizes.dim(made.meta["val"]) == pytest.approx(50.0)
