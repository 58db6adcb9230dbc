"""Sizes of a graph's values on one real execution.

The captured graph has static shapes except behind all-to-alls, whose row
counts depend on routing. Running the graph once through an interpreter
records the bytes every node produced on a real batch (what ``lancet
inspect`` reports for the all-to-alls).
"""

from __future__ import annotations

import torch
from torch import fx


def output_bytes(value: object) -> int:
    """Bytes of the tensors a node produced (tuples summed; non-tensors count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(output_bytes(v) for v in value)
    return 0


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and keeps the bytes each node produced, by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.output_bytes: dict[str, int] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.output_bytes[node.name] = output_bytes(result)
        return result


def record_shapes(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> ShapeRecorder:
    """Execute ``gm`` once on ``inputs`` (under no_grad) and return the recorder."""
    recorder = ShapeRecorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder
