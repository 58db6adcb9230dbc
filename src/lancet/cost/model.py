"""The cost model interface: what each node of a graph costs, as the simulator needs it.

``NodeCosts`` is the only thing the simulator and the passes read. It can come
from a measured profile (``lancet.cost.profile``, ``lancet.cost.comm``) or be
written by hand (tests use toy costs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import fx

from lancet.graph.roles import Role, collective_kind, node_role


@dataclass(slots=True)
class NodeCosts:
    """Per-node costs in milliseconds, and output sizes in bytes, keyed by node name."""

    compute_ms: dict[str, float] = field(default_factory=dict)
    """Compute (and host-sync) nodes; missing names cost 0 (views, size queries)."""
    comm_ms: dict[str, float] = field(default_factory=dict)
    """Collective start nodes: time on the communication lane."""
    out_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes each node produces (memory model)."""
    contention: float = 1.0
    """Compute slows down by this factor while a collective is in flight (>= 1)."""

    def compute(self, node: fx.Node) -> float:
        return self.compute_ms.get(node.name, 0.0)

    def comm(self, node: fx.Node) -> float:
        return self.comm_ms.get(node.name, 0.0)


class CostModel(Protocol):
    """Anything that can price a graph."""

    def costs(self, graph: fx.Graph) -> NodeCosts: ...


@dataclass(slots=True)
class ToyCostModel:
    """Fixed costs per op kind; for tests and examples.

    Compute nodes cost ``compute_ms`` (views 0), collectives ``comm_ms`` per
    kind, every node produces ``bytes_per_node``.
    """

    compute_ms: float = 1.0
    comm_ms: dict[str, float] = field(default_factory=lambda: {"all_to_all": 4.0, "all_reduce": 2.0})
    bytes_per_node: int = 0
    contention: float = 1.0
    overrides: dict[str, float] = field(default_factory=dict)
    """Per node-name cost overrides (compute or comm)."""

    def costs(self, graph: fx.Graph) -> NodeCosts:
        from lancet.graph.roles import is_view

        out = NodeCosts(contention=self.contention)
        for node in graph.nodes:
            role = node_role(node)
            if role == Role.COMM_START:
                out.comm_ms[node.name] = self.overrides.get(node.name, self.comm_ms.get(collective_kind(node), 0.0))
            elif role == Role.COMPUTE and not is_view(node):
                out.compute_ms[node.name] = self.overrides.get(node.name, self.compute_ms)
            out.out_bytes[node.name] = self.bytes_per_node
        return out
