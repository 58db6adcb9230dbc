"""Mixture-of-Experts layer with explicit expert-parallel process group."""

from lancet.moe.gates import DISPATCH_KINDS, GATE_KINDS, GateConfig, Routing, default_dispatch, route
from lancet.moe.layer import MoELayer, MoEOutput

__all__ = ["DISPATCH_KINDS", "GATE_KINDS", "GateConfig", "MoELayer", "MoEOutput", "Routing", "default_dispatch", "route"]
