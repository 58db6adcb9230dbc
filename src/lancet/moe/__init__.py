"""Mixture-of-Experts layer with explicit expert-parallel process group."""

from lancet.moe.gates import GATE_KINDS, GateConfig, Routing, route
from lancet.moe.layer import MoELayer, MoEOutput

__all__ = ["GATE_KINDS", "GateConfig", "MoELayer", "MoEOutput", "Routing", "route"]
