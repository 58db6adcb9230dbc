"""Batch the forward's casts of parameters into one foreach copy at the start of the step.

Under autocast every use of a parameter in a lower-precision op casts it (``aten._to_copy`` with only a
dtype): about eight casts per transformer block, each a kernel of its own, since nothing around a
cast (a GEMM) can take it in. This rewrite replaces all of them by the outputs of one
``aten._foreach_copy`` into fresh tensors of the cast's dtype, placed right after the graph's inputs:
Inductor makes one kernel of a foreach copy, and op by op it is one multi-tensor launch. The values are
the same conversion, so bitwise equal; the bf16 copies live from the step's start instead of from their
layer's forward, and they live until the backward reads them either way.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lancet.graph import meta

aten = torch.ops.aten


def _parameter_casts(graph: fx.Graph, num_params: int) -> list[fx.Node]:
    params = [n for n in graph.nodes if n.op == "placeholder"][:num_params]
    return [
        user for param in params for user in param.users
        if user.op == "call_function" and user.target is aten._to_copy.default and len(user.args) == 1
        and set(user.kwargs) == {"dtype"} and meta.phase(user) == meta.FORWARD
        and isinstance(user.meta.get("val"), torch.Tensor)
    ]


def batch_parameter_casts(gm: fx.GraphModule, num_params: int) -> int:
    """Rewrite ``gm`` in place (see the module docstring); returns how many casts were batched (0: unchanged).

    Contract: same outputs bitwise; only forward casts of the first ``num_params`` placeholders with a dtype
    and nothing else change (a parameter cast more than once to one dtype is copied once); fewer than two
    such casts leave the graph as it is.
    """
    graph = gm.graph
    casts = _parameter_casts(graph, num_params)
    if len(casts) < 2:
        return 0
    cursor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def add(target, args, kwargs, node_meta) -> fx.Node:  # each new node after the one before
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = graph.call_function(target, args, kwargs)
        cursor.meta = node_meta
        return cursor

    def key(cast: fx.Node) -> tuple:  # a parameter cast twice to one dtype is copied once
        return cast.args[0], cast.kwargs["dtype"]

    first: dict[tuple, fx.Node] = {}
    for cast in casts:
        first.setdefault(key(cast), cast)
    empties = [add(aten.empty.memory_format, (list(c.meta["val"].shape),),
                   {"dtype": c.kwargs["dtype"], "device": c.meta["val"].device}, dict(c.meta)) for c in first.values()]
    copies = add(aten._foreach_copy.default, (empties, [c.args[0] for c in first.values()]), {},
                 {**casts[0].meta, "val": [c.meta["val"] for c in first.values()]})
    items = {k: add(operator.getitem, (copies, index), {}, dict(c.meta)) for index, (k, c) in enumerate(first.items())}
    for cast in casts:
        cast.replace_all_uses_with(items[key(cast)])
        graph.erase_node(cast)
    graph.lint()
    gm.recompile()
    return len(casts)
