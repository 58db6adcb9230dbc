"""The cost model interface: what each node of a graph costs, as the simulator needs it.

``NodeCosts`` is the only thing the simulator and the passes read. It can come
from a measured profile (``lancet.cost.profile``, ``lancet.cost.comm``) or be
written by hand (tests use toy costs).
"""

from __future__ import annotations

import statistics
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
    comm_contention: float = 1.0
    """A collective slows down by this factor while compute runs beside it (>= 1)."""
    host_ms: dict[str, float] = field(default_factory=dict)
    """Host time to issue each node (launch overhead); empty: the host is never the bottleneck."""
    default_host_ms: float = 0.0
    """Issue time of nodes ``host_ms`` does not name."""
    collective_host_ms: float = 0.0
    """Issue time of a collective."""
    ranks: list[NodeCosts] = field(default_factory=list)
    """Each rank's own costs, when they differ (the simulator then runs every rank); the fields above are
    what every rank agrees on (medians) and what the passes plan with."""

    def compute(self, node: fx.Node) -> float:
        return self.compute_ms.get(node.name, 0.0)

    def host(self, node: fx.Node) -> float:
        return self.host_ms.get(node.name, self.default_host_ms)

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


@dataclass(slots=True)
class ProfiledCostModel:
    """Costs from a measured compute profile and comm curves.

    Compute nodes take their measured time by name; collectives are priced
    from their measured bytes on the comm curves. Nodes the profile does not
    name cost 0 and are listed in ``unpriced``. A profile of several ranks also
    gives every rank's own costs (``NodeCosts.ranks``). Collectives take their
    time measured in the profile when it has one; otherwise all-to-alls are
    priced by the bytes each rank sends to and receives from other ranks when
    the profiles have them (``CommProfile.all_to_all_ms``), else by the bytes
    received.
    """

    profile: "ComputeProfile"  # noqa: F821 (lancet.cost.profile)
    comm: "CommProfile"  # noqa: F821 (lancet.cost.comm)
    model_host: bool = True
    """Model the host's issue time (GPU runs); off where the host does the compute itself (CPU runs)."""
    per_rank: bool = True
    """Attach each rank's own costs (when the profile has them) so the simulator models rank skew."""
    unpriced: list[str] = field(default_factory=list)

    def costs(self, graph: fx.Graph) -> NodeCosts:
        """The agreed (median) costs, with each rank's own costs in ``ranks`` when the profile has them."""
        self.unpriced = []
        p = self.profile
        scale = host_scale(p, self.comm, graph)
        out = self._priced(graph, p.node_ms, p.host_ms, p.comm_bytes, p.offrank_bytes, p.comm_ms, self.unpriced, scale)
        if self.per_rank:
            out.ranks = [
                self._priced(graph, r.node_ms, r.host_ms, r.comm_bytes, r.offrank_bytes, r.comm_ms, [], scale)
                for r in p.ranks
            ]
        return out

    def _priced(
        self, graph: fx.Graph, node_ms: dict, host_ms: dict, comm_bytes: dict, offrank: dict, comm_ms: dict,
        unpriced: list[str], scale: float,
    ) -> NodeCosts:
        from lancet.cost.profile import is_timed

        out = NodeCosts(
            contention=self.comm.contention,
            comm_contention=self.comm.comm_contention,
            out_bytes=dict(self.profile.out_bytes),
        )
        if self.model_host and host_ms:
            out.host_ms = {name: ms * scale for name, ms in host_ms.items()}
            out.default_host_ms = statistics.median(host_ms.values()) * scale
            out.collective_host_ms = self.comm.issue_ms
        for node in graph.nodes:
            role = node_role(node)
            if role == Role.COMM_START:
                nbytes = comm_bytes.get(node.name)
                if nbytes is None:
                    unpriced.append(node.name)
                    continue
                kind = collective_kind(node)
                modelled = None
                if node.name in comm_ms:
                    modelled = comm_ms[node.name]
                elif kind == "all_to_all" and node.name in offrank:
                    modelled = self.comm.all_to_all_ms(*offrank[node.name], self.profile.world_size)
                out.comm_ms[node.name] = modelled if modelled is not None else self.comm.ms(kind, nbytes)
            elif node.op == "call_function" and is_timed(node):
                ms = node_ms.get(node.name)
                if ms is None:
                    unpriced.append(node.name)
                    continue
                out.compute_ms[node.name] = ms
        return out


def host_scale(profile: "ComputeProfile", comm: "CommProfile", graph: fx.Graph) -> float:  # noqa: F821
    """Factor on per-node host times that makes issuing ``graph`` (the profiled graph, in any order) cost
    what issuing it whole was measured to cost (``ComputeProfile.issue_ms``).

    Per-node times repeat one call on the same arguments; a whole run also pays for fresh
    allocations, freeing and the Python between calls. The simulator charges every compute, host
    sync and host wait node its host time and every collective the comm profile's issue time; the
    factor spreads the difference over the nodes. 1 without a measurement; kept within [0.25, 4].
    """
    if profile.issue_ms <= 0 or not profile.host_ms:
        return 1.0
    default = statistics.median(profile.host_ms.values())
    charged, collectives = 0.0, 0
    for node in graph.nodes:
        role = node_role(node)
        if role == Role.COMM_START:
            collectives += 1
        elif node.op == "call_function" and role in (Role.COMPUTE, Role.HOST_SYNC, Role.HOST_WAIT):
            charged += profile.host_ms.get(node.name, default)
    if charged <= 0:
        return 1.0
    return min(max((profile.issue_ms - collectives * comm.issue_ms) / charged, 0.25), 4.0)
