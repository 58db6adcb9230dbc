"""Graph modules whose Python code is generated when first needed, not at every rewrite.

A range search rewrites and prices the step graph a few hundred times and never runs those graphs;
generating and compiling each one's Python code took over a third of ``lancet optimize``. torch's
``_LazyGraphModule`` (what Inductor uses for the same reason) defers that work until the module's code is
read or the module is called, so a graph that is run behaves exactly as an ordinary ``GraphModule``.
It is a private torch class: where it is missing, an ordinary ``GraphModule`` is made instead.
"""

from __future__ import annotations

from torch import fx, nn

try:
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # pragma: no cover - present in every torch this package supports
    _LazyGraphModule = None


def lazy_graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A graph module of ``graph`` over ``root``'s attributes; ``recompile()`` on it only marks it stale."""
    if _LazyGraphModule is None:
        return fx.GraphModule(root, graph)
    return _LazyGraphModule(root, graph)
