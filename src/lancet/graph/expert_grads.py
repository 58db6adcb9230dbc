"""Which parameters are expert-local, read from the captured step graph.

An expert's weight sees only the tokens the dispatch all-to-all brought to this
rank, and its gradient is computed from the gradient the combine's backward
all-to-all (``combine_grad``) brought back. So a parameter is expert-local when
its gradient is reached from a ``combine_grad`` all-to-all through compute
alone. A dense parameter before a MoE layer is reached from it too, but only
through the dispatch's backward all-to-all (the gradient goes home to the
token's rank first); a router weight, whose gradient reads the combined
forward result, is not reached from it at all.

The graph must hold the raw gradients: capture the step with every parameter
marked expert-local (no data-parallel all-reduce), since a bucketed all-reduce
concatenates the gradients of many parameters.
"""

from __future__ import annotations

from torch import fx

from lancet.graph.analysis import GraphAnalysis
from lancet.graph.roles import WAIT_OPS, collective_kind


def _arrival(graph: fx.Graph, combine_grad_waits: dict[fx.Node, int]) -> dict[fx.Node, frozenset[int]]:
    """Node -> the MoE layers whose ``combine_grad`` reaches it through compute only (no other all-to-all)."""
    arrived: dict[fx.Node, frozenset[int]] = {}
    for node in graph.nodes:
        if node.target in WAIT_OPS and collective_kind(node.args[0]) == "all_to_all":
            layer = combine_grad_waits.get(node)
            arrived[node] = frozenset() if layer is None else frozenset({layer})
            continue
        layers: frozenset[int] = frozenset()
        for source in node.all_input_nodes:
            layers |= arrived.get(source, frozenset())
        arrived[node] = layers
    return arrived


def expert_gradient_layers(
    analysis: GraphAnalysis, param_names: list[str], gradient_outputs: list[fx.Node]
) -> dict[str, list[int]]:
    """Parameter name -> the MoE layers whose combine's backward all-to-all its gradient comes back through.

    ``gradient_outputs`` are the nodes of the parameters' gradients (``param_names`` order); parameters
    whose gradients come back through no all-to-all are left out.
    """
    waits = {
        layer.combine_grad.wait: layer.index for layer in analysis.moe_layers if layer.combine_grad is not None
    }
    arrived = _arrival(analysis.graph, waits)
    found = {}
    for name, grad in zip(param_names, gradient_outputs):
        layers = arrived.get(grad, frozenset()) if isinstance(grad, fx.Node) else frozenset()
        if layers:
            found[name] = sorted(layers)
    return found
