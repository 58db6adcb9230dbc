"""Concrete shapes of a graph's values on one real execution.

The captured graph has static shapes except behind all-to-alls, whose row
counts depend on routing. Running the graph once through an interpreter
records what every node produced on a real batch: the byte sizes of the
all-to-alls, the shapes the profiler keys costs by, and the sizes the memory
model needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    device: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def to_json(self) -> list:
        return [list(self.shape), self.dtype]


def spec_of(value: object) -> TensorSpec | None:
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), str(value.dtype).removeprefix("torch."), value.device.type)
    return None


def output_bytes(value: object) -> int:
    """Bytes of the tensors a node produced (tuples summed; non-tensors count 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(output_bytes(v) for v in value)
    return 0


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and keeps, per node, the TensorSpecs of its inputs and outputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.outputs: dict[str, object] = {}
        self.output_bytes: dict[str, int] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.output_bytes[node.name] = output_bytes(result)
        if isinstance(result, (tuple, list)):
            self.outputs[node.name] = tuple(spec_of(v) for v in result)
        else:
            self.outputs[node.name] = spec_of(result) if isinstance(result, torch.Tensor) else result
        return result


def record_shapes(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> ShapeRecorder:
    """Execute ``gm`` once on ``inputs`` (under no_grad) and return the recorder."""
    recorder = ShapeRecorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder
