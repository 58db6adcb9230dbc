"""Give each fused-attention backward without dropout its own unused RNG seed instead of the forward's.

A fused attention forward on CUDA (flash, memory-efficient, cuDNN) returns its dropout RNG seed and offset,
and its backward takes them back. Where those tensors live depends on the moment: on the host when the
forward runs normally, on the GPU while it is captured into a CUDA graph (torch's own meta kernels note
this). A compiled backward region that first ran on the host tensors then sees GPU tensors at capture time,
its guards fail, and it would recompile inside the capture. Without dropout the backward never reads them,
so this rewrite feeds it a fresh, empty tensor of the same shape and dtype, made inside the backward (on the
host; on the query's device for backwards that check it), and the forward no longer hands anything that
changes with capture to the backward.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

SEED_ARGUMENTS = ("philox_seed", "philox_offset", "rng_state", "unused")
"""Names under which attention backwards take the forward's RNG state."""

ATTENTION_BACKWARDS = (
    aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention_backward.default,
    aten._scaled_dot_product_fused_attention_overrideable_backward.default,
    aten._flash_attention_backward.default,
    aten._efficient_attention_backward.default,
)


def _argument(node: fx.Node, index: int, name: str):
    return node.args[index] if index < len(node.args) else node.kwargs.get(name)


def _without_dropout(node: fx.Node, positions: dict[str, int]) -> bool:
    dropout = _argument(node, positions["dropout_p"], "dropout_p")
    return isinstance(dropout, (int, float)) and dropout == 0


def _seed_slots(node: fx.Node) -> list[tuple[int, str]]:
    """(position, name) of each argument of ``node`` that takes a forward's RNG state as an fx node."""
    positions = {a.name: i for i, a in enumerate(node.target._schema.arguments)}
    if "dropout_p" not in positions or not _without_dropout(node, positions):
        return []
    return [(i, name) for name, i in positions.items()
            if name in SEED_ARGUMENTS and isinstance(_argument(node, i, name), fx.Node)]


ON_QUERY_DEVICE = (aten._scaled_dot_product_cudnn_attention_backward.default,)
"""Backwards that check their RNG state lives on the query's device (measured: cuDNN's refuses a host seed)."""


def _device_for(node: fx.Node) -> torch.device:
    query = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
    if node.target in ON_QUERY_DEVICE and isinstance(query, torch.Tensor):
        return query.device
    return torch.device("cpu")


def _empty_seed(graph: fx.Graph, before: fx.Node, source: fx.Node) -> fx.Node:
    value = source.meta.get("val")
    shape = list(value.shape) if isinstance(value, torch.Tensor) else []
    dtype = value.dtype if isinstance(value, torch.Tensor) else torch.int64
    device = _device_for(before)
    with graph.inserting_before(before):
        empty = graph.call_function(aten.empty.memory_format, (shape,), {"dtype": dtype, "device": device})
    empty.meta = {k: v for k, v in before.meta.items() if k != "val"}
    mode = getattr(value, "fake_mode", None)
    if mode is not None:
        with mode:
            empty.meta["val"] = torch.empty(shape, dtype=dtype, device=device)
    return empty


def detach_attention_seeds(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the module docstring); returns how many seed arguments were replaced.

    Contract: only attention backwards whose ``dropout_p`` is the constant 0 change, and only in their RNG
    state arguments; an ``operator.getitem`` of a forward's result left without users is removed. Outputs are
    unchanged (those kernels do not read the state without dropout). A graph without such backwards (every
    graph traced on the CPU, whose attention has no RNG state) is left as it is.
    """
    graph = gm.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ATTENTION_BACKWARDS:
            continue
        for index, name in _seed_slots(node):
            source = _argument(node, index, name)
            empty = _empty_seed(graph, node, source)
            if index < len(node.args):
                node.update_arg(index, empty)
            else:
                node.update_kwarg(name, empty)
            replaced += 1
            if source.op == "call_function" and source.target is operator.getitem and not source.users:
                graph.erase_node(source)
    if replaced:
        graph.lint()
        gm.recompile()
    return replaced
