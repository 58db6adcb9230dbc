"""Trace lancet's padded-dispatch ops through their implementations inside a region about to be compiled.

In the captured graph ``lancet::capacity_slots``, ``slot_scatter`` and ``slot_gather`` are opaque custom
ops: the partition pass reads them, and a part of a partitioned layer recomputes its own capacity in
them. Handed to Inductor as they are, each runs as an extern call of several unfused kernels and cuts
the fusion of the ops around it. A region's shapes are fixed, so before it is compiled its graph is
traced again (``make_fx`` on fake tensors) with each of these ops replaced by its implementation
(``lancet.moe.padded.IMPLEMENTATIONS``): the ATen ops that the op itself runs, so the same values, now
visible to Inductor. Regions without these ops are compiled as they are.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.moe.padded import IMPLEMENTATIONS


def inline_table() -> dict:
    """Op overload -> implementation, for ``make_fx``'s decomposition table."""
    return {getattr(torch.ops.lancet, name).default: impl for name, impl in IMPLEMENTATIONS.items()}


def holds_inlinable_ops(module: fx.GraphModule) -> bool:
    """Whether ``module`` calls any of the ops ``inline_lancet_ops`` replaces."""
    table = inline_table()
    return any(node.op == "call_function" and node.target in table for node in module.graph.nodes)


def inline_lancet_ops(module: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """``module`` with every padded-dispatch op traced through its implementation (``module`` itself when it
    holds none). ``args``: the region's inputs (real tensors; only their metadata is used)."""
    if not holds_inlinable_ops(module):
        return module
    return make_fx(module, decomposition_table=inline_table(), tracing_mode="fake")(*args)
