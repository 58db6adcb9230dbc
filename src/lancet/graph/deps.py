"""Reachability between the nodes of a graph (ancestor sets as integer bitsets)."""

from __future__ import annotations


from torch import fx


class Reachability:
    """Answers "must a run before b?" for every pair of nodes of a graph, in O(1) after O(N*E/64) setup."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes: list[fx.Node] = list(graph.nodes)
        self.index: dict[fx.Node, int] = {n: i for i, n in enumerate(self.nodes)}
        self._ancestors: list[int] = []
        for node in self.nodes:
            bits = 0
            for producer in node.all_input_nodes:
                j = self.index[producer]
                bits |= self._ancestors[j] | (1 << j)
            self._ancestors.append(bits)

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        """True if ``b`` (transitively) consumes ``a``."""
        return bool(self._ancestors[self.index[b]] >> self.index[a] & 1)

    def descendants_mask(self, node: fx.Node) -> int:
        """Bitset of the nodes that (transitively) consume ``node``."""
        i = self.index[node]
        mask = 0
        for j in range(i + 1, len(self.nodes)):
            if self._ancestors[j] >> i & 1:
                mask |= 1 << j
        return mask

    def in_mask(self, node: fx.Node, mask: int) -> bool:
        return bool(mask >> self.index[node] & 1)
