"""Costs of a graph as it runs under the compiled or CUDA-graph executor.

Passes move single nodes, so plans are priced node by node; but under the
compiled executor a node does not run alone: Inductor fuses its region, and the
host issues the region in one call. ``ExecutorProfile`` holds what ``lancet
profile --executor compiled|cudagraph`` measured per compiled region (device time
of the compiled region on its real inputs, host time of one call) beside the
eager time of its nodes; ``ExecutorCostModel`` wraps any cost model and prices a
graph the way it will run:

- a node in a compiled region costs its eager time times its region's
  compiled/eager ratio (the region it was in when profiled: by name, or by the
  ``origin`` a partition pass recorded; a node never profiled takes the ratio
  of all compiled regions together);
- host time (when the base model prices the host at all: GPU profiles): under
  ``compiled`` a compiled region costs the host one call (its measured host time,
  charged to the region's first node; a region never profiled takes the median
  call), nodes left to run as traced keep their own; under ``cudagraph`` the host
  issues nothing but the graph launches (0).

Regions are cut from the graph being priced exactly as the executor cuts them
(``lancet.graph.regions``), so a plan that moves a node into another window
prices it in the region it will run in.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace

from torch import fx

from lancet.cost.model import NodeCosts
from lancet.graph import meta
from lancet.graph.regions import MIN_KERNELS, cut_regions


@dataclass(slots=True)
class RegionTime:
    """One compiled region of the profiled graph, as measured."""

    index: int
    phase: str
    nodes: list[str]
    device_ms: float
    """Device time of the compiled region on its real inputs (kernels back to back)."""
    host_ms: float
    """Host time of one call of the compiled region."""
    eager_ms: float
    """Sum of its nodes' profiled (eager) device times."""

    @property
    def ratio(self) -> float:
        return self.device_ms / self.eager_ms if self.eager_ms > 0 else 1.0


@dataclass(slots=True)
class ExecutorProfile:
    """What an executor measured on the profiled graph (``lancet profile --executor``)."""

    kind: str
    """``compiled`` or ``cudagraph``."""
    regions: list[RegionTime] = field(default_factory=list)
    issue_ms: float = 0.0
    """Host time to issue one whole step under this executor (a replay, for ``cudagraph``), less host waits."""
    compile: dict = field(default_factory=dict)
    """The compile report (``lancet.runtime.compile.CompileReport``)."""
    min_kernels: int = MIN_KERNELS

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExecutorProfile:
        regions = [RegionTime(**r) for r in data.get("regions", [])]
        return cls(kind=data["kind"], regions=regions, issue_ms=float(data.get("issue_ms", 0.0)),
                   compile=data.get("compile", {}), min_kernels=int(data.get("min_kernels", MIN_KERNELS)))

    def node_ratio(self) -> dict[str, float]:
        """Node name -> compiled/eager ratio of the profiled region that held it."""
        return {name: region.ratio for region in self.regions for name in region.nodes}

    def overall_ratio(self) -> float:
        """Compiled over eager device time of all compiled regions together (1 without any)."""
        eager = sum(r.eager_ms for r in self.regions)
        return sum(r.device_ms for r in self.regions) / eager if eager > 0 else 1.0

    def region_host_ms(self) -> dict[str, float]:
        """First node of each profiled region -> host time of one call of that region."""
        return {region.nodes[0]: region.host_ms for region in self.regions if region.nodes}

    def summary(self) -> dict[str, float]:
        """Totals over the profiled regions (ms), for reports."""
        return {"regions": len(self.regions), "eager_ms": sum(r.eager_ms for r in self.regions),
                "compiled_ms": sum(r.device_ms for r in self.regions),
                "host_ms": sum(r.host_ms for r in self.regions), "issue_ms": self.issue_ms}


def _origin(node: fx.Node) -> str:
    return meta.get(node, meta.ORIGIN, node.name)


def price_for_executor(costs: NodeCosts, graph: fx.Graph, executor: ExecutorProfile) -> NodeCosts:
    """``costs`` of ``graph`` (eager pricing) turned into its costs under ``executor`` (see module docstring)."""
    ratio, default_ratio = executor.node_ratio(), executor.overall_ratio()
    region_host = executor.region_host_ms()
    median_host = statistics.median(region_host.values()) if region_host else 0.0
    graphed, model_host = executor.kind == "cudagraph", bool(costs.host_ms)
    compute, host = dict(costs.compute_ms), dict(costs.host_ms)
    for region in cut_regions(graph, executor.min_kernels):
        if not region.compiled:
            continue
        for node in region.nodes:
            if node.name in compute:
                compute[node.name] *= ratio.get(_origin(node), default_ratio)
            if model_host:
                host[node.name] = 0.0
        if model_host and not graphed:
            host[region.nodes[0].name] = region_host.get(_origin(region.nodes[0]), median_host)
    if graphed:
        host = {name: 0.0 for name in host}
    priced = replace(costs, compute_ms=compute, host_ms=host)
    if graphed:
        priced.default_host_ms = 0.0
        priced.collective_host_ms = 0.0
    priced.ranks = [price_for_executor(rank, graph, executor) for rank in costs.ranks]
    return priced


@dataclass(slots=True)
class ExecutorCostModel:
    """A cost model priced for an executor: ``base`` (any model with ``costs(graph)``) scaled by ``executor``."""

    base: object
    executor: ExecutorProfile

    def costs(self, graph: fx.Graph) -> NodeCosts:
        return price_for_executor(self.base.costs(graph), graph, self.executor)

    @property
    def unpriced(self) -> list[str]:
        return getattr(self.base, "unpriced", [])
