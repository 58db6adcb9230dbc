"""Hand-built step graphs for pass and simulator tests."""

from __future__ import annotations

import torch
from torch import fx

from lancet.capture.trace import TrainGraph

c10d = torch.ops._c10d_functional
aten = torch.ops.aten


class GraphBuilder:
    """Builds an fx graph whose nodes carry the phase annotation a traced TrainStep has."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.phase = "forward"

    def input(self, name: str) -> fx.Node:
        return self.graph.placeholder(name)

    def op(self, target, *args, name: str | None = None) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta["custom"] = {"phase": self.phase}
        if name:
            node.name = name
        return node

    def mm(self, a, b, name=None) -> fx.Node:
        return self.op(aten.mm.default, a, b, name=name)

    def all_to_all(self, x, splits, name: str) -> tuple[fx.Node, fx.Node]:
        start = self.op(c10d.all_to_all_single.default, x, splits, splits, "0", name=name)
        wait = self.op(c10d.wait_tensor.default, start, name=f"wait_{name}")
        return start, wait

    def all_reduce(self, x, name: str) -> tuple[fx.Node, fx.Node]:
        start = self.op(c10d.all_reduce.default, x, "sum", "0", name=name)
        wait = self.op(c10d.wait_tensor.default, start, name=f"wait_{name}")
        return start, wait

    def finish(self, *outputs: fx.Node) -> TrainGraph:
        self.graph.output(tuple(outputs))
        gm = fx.GraphModule(torch.nn.Module(), self.graph)
        return TrainGraph(gm=gm, param_names=[], batch_shape=(), device=torch.device("cpu"))


def two_layer_backward() -> TrainGraph:
    """A backward chain through two MoE all-to-alls, each layer with a weight-gradient mm.

        grad -> dx1 -> [a2a_1] -> dx2 -> [a2a_2] -> out
        dw1 = act1^T grad      (free to run inside a2a_1 or a2a_2)
        dw2 = act2^T wait_1    (free to run inside a2a_2)
    """
    b = GraphBuilder()
    grad, w, act1, act2 = (b.input(n) for n in ("grad", "w", "act1", "act2"))
    splits = [b.input("split0"), b.input("split1")]
    b.phase = "backward"
    dx1 = b.mm(grad, w, name="dx1")
    dw1 = b.mm(act1, grad, name="dw1")
    a2a_1, wait_1 = b.all_to_all(dx1, splits, "a2a_1")
    dx2 = b.mm(wait_1, w, name="dx2")
    dw2 = b.mm(act2, wait_1, name="dw2")
    a2a_2, wait_2 = b.all_to_all(dx2, splits, "a2a_2")
    out = b.mm(wait_2, w, name="out")
    return b.finish(out, dw1, dw2)


def backward_with_allreduce() -> TrainGraph:
    """Two backward all-to-alls with a long compute gap between them, and a gradient all-reduce at the end.

        grad -> dx1 -> [a2a_1] -> dx2 -> dx3 -> dx4 -> [a2a_2] -> out ... [allreduce(dw1)] at the end
    """
    b = GraphBuilder()
    grad, w, act = (b.input(n) for n in ("grad", "w", "act"))
    splits = [b.input("split0"), b.input("split1")]
    b.phase = "backward"
    dx1 = b.mm(grad, w, name="dx1")
    dw1 = b.mm(act, grad, name="dw1")
    a2a_1, wait_1 = b.all_to_all(dx1, splits, "a2a_1")
    dx2 = b.mm(wait_1, w, name="dx2")
    dx3 = b.mm(dx2, w, name="dx3")
    dx4 = b.mm(dx3, w, name="dx4")
    a2a_2, wait_2 = b.all_to_all(dx4, splits, "a2a_2")
    out = b.mm(wait_2, w, name="out")
    flat = b.op(aten.view.default, dw1, [-1], name="flat")
    ar, ar_wait = b.all_reduce(flat, "allreduce")
    return b.finish(out, ar_wait)
