"""A model's output taken apart into its tensors and put back together around other tensors.

The forward graph of a step (``capture_forward``) ends at the model's output, not at the loss: the
loss function then runs on the output rebuilt from the graph's results, inside the traced step, so
a loss with its own backward (``lancet.losses.linear_cross_entropy``) keeps that backward when a
pass rewrites the forward. Outputs may nest containers that ``torch.utils._pytree`` knows (tuples,
lists, dicts, named tuples, transformers' ``ModelOutput``), dataclasses and plain objects (their
attributes, on a shallow copy); every other value is kept as it was at trace time and must not
depend on the traced shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor


class OutputError(TypeError):
    """A model output holds a value that cannot be carried through a forward graph."""


@dataclass(frozen=True, slots=True)
class OutputTree:
    """How to rebuild a model output from its tensors in order (``flatten_output``'s second result)."""

    num_tensors: int
    _build: Callable[[list[Tensor]], Any]

    def rebuild(self, tensors: list[Tensor]) -> Any:
        if len(tensors) != self.num_tensors:
            raise ValueError(f"the model output holds {self.num_tensors} tensors, got {len(tensors)}")
        return self._build(list(tensors))


def _attribute_builder(value: Any, fields: list[str], builders: list) -> Callable:
    def build(tensors: list[Tensor]) -> Any:
        rebuilt = copy.copy(value)
        for name, child in zip(fields, builders):
            try:
                setattr(rebuilt, name, child(tensors))
            except dataclasses.FrozenInstanceError:
                object.__setattr__(rebuilt, name, child(tensors))
        return rebuilt

    return build


def _flatten(value: Any, where: str, tensors: list[Tensor]) -> Callable[[list[Tensor]], Any]:
    """Append ``value``'s tensors to ``tensors``; return a function that takes them back off the front in order."""
    if isinstance(value, Tensor):
        tensors.append(value)
        return lambda ts: ts.pop(0)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise OutputError(f"the model output's {where} is a size that depends on the batch ({value}); "
                          "return it as a tensor or a plain number")
    node = pytree.SUPPORTED_NODES.get(pytree._get_node_type(value))
    if node is not None:
        children, context = node.flatten_fn(value)
        builders = [_flatten(child, f"{where}[{i}]", tensors) for i, child in enumerate(children)]
        return lambda ts: node.unflatten_fn([b(ts) for b in builders], context)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value)]
        builders = [_flatten(getattr(value, name), f"{where}.{name}", tensors) for name in fields]
        return _attribute_builder(value, fields, builders)
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, (type, torch.nn.Module)):
        names = list(attributes)
        builders = [_flatten(attributes[name], f"{where}.{name}", tensors) for name in names]
        return _attribute_builder(value, names, builders)
    return lambda ts: value


def flatten_output(out: Any) -> tuple[list[Tensor], OutputTree]:
    """The tensors of a model output, in a fixed order, and the tree that rebuilds it around new tensors."""
    tensors: list[Tensor] = []
    build = _flatten(out, "output", tensors)
    return tensors, OutputTree(len(tensors), build)
