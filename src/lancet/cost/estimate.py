"""Costs for graphs a pass created, priced from the profile of the graph it started from.

A partitioned graph has nodes the profile never timed: per-part copies of
profiled nodes, gathers and slices between them, and the backward autograd
derives for them. This model prices them without running anything:

- a node copied from a profiled node (``meta["custom"]["origin"]``) costs the
  original's time divided by its number of parts, but never less than the
  fastest kernel of that op (small kernels do not get faster when split);
  a whole copy costs the original's time; host issue time is the original's;
- any other node costs bytes out times the op's measured ms-per-byte (median
  over the profiled nodes of that op), at least that op's fastest kernel;
- collectives are priced on the comm curves from their output bytes.

Output sizes come from the node's fake value; data-dependent row counts
(all-to-all sizes) are taken as the profiled average split over the parts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from torch import fx

from lancet.cost.comm import CommProfile
from lancet.cost.model import NodeCosts
from lancet.cost.profile import ComputeProfile, is_timed
from lancet.graph.roles import Role, collective_kind, is_view, node_role


@dataclass(slots=True)
class _OpScale:
    ms_per_byte: float
    floor_ms: float


def _fit(profile: ComputeProfile, targets: dict[str, str]) -> tuple[dict[str, _OpScale], _OpScale]:
    samples: dict[str, list[tuple[int, float]]] = {}
    for name, ms in profile.node_ms.items():
        nbytes = profile.out_bytes.get(name, 0)
        if name in targets and nbytes > 0:
            samples.setdefault(targets[name], []).append((nbytes, ms))
    scales = {
        target: _OpScale(statistics.median(ms / b for b, ms in pts), min(ms for _, ms in pts))
        for target, pts in samples.items()
    }
    everything = [pt for pts in samples.values() for pt in pts] or [(1, 0.0)]
    default = _OpScale(statistics.median(ms / b for b, ms in everything), min(ms for _, ms in everything))
    return scales, default


def _dim(size, unbacked_rows: float) -> float:
    if isinstance(size, int):
        return float(size)
    symbols = getattr(getattr(size, "node", None), "expr", None)
    count = len(symbols.free_symbols) if symbols is not None else 1
    return count * unbacked_rows  # a sum of data-dependent split sizes


def _numel(value, unbacked_rows: float) -> float:
    if not isinstance(value, torch.Tensor):
        return 0.0
    numel = 1.0
    for size in value.shape:
        numel *= _dim(size, unbacked_rows)
    return numel


def _out_bytes(node: fx.Node, unbacked_rows: float) -> float:
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    return sum(_numel(v, unbacked_rows) * v.element_size() for v in values if isinstance(v, torch.Tensor))


@dataclass(slots=True)
class DerivedCostModel:
    """Prices a rewritten graph from the profile of its source graph (see module docstring)."""

    profile: ComputeProfile
    comm: CommProfile
    source_targets: dict[str, str]
    """Source graph node name -> op (str of its target)."""
    unbacked_rows: float
    """Expected rows behind one data-dependent size of the unpartitioned graph."""
    model_host: bool = True
    _scales: dict[str, _OpScale] = field(default_factory=dict)
    _default: _OpScale | None = None

    def __post_init__(self) -> None:
        self._scales, self._default = _fit(self.profile, self.source_targets)

    def _scale(self, target: str) -> _OpScale:
        return self._scales.get(target, self._default)

    def _compute_ms(self, node: fx.Node, parts: int) -> float:
        custom = node.meta.get("custom", {})
        origin, part = custom.get("origin", node.name), custom.get("part")
        scale = self._scale(str(node.target))
        if origin in self.profile.node_ms and self.source_targets.get(origin) == str(node.target):
            base = self.profile.node_ms[origin]
            return base if part is None else max(base / parts, scale.floor_ms)
        return max(_out_bytes(node, self.unbacked_rows / parts) * scale.ms_per_byte, scale.floor_ms)

    def costs(self, graph: fx.Graph) -> NodeCosts:
        out = NodeCosts(contention=self.comm.contention, comm_contention=self.comm.comm_contention)
        host = self.profile.host_ms if self.model_host else {}
        if host:
            out.default_host_ms = statistics.median(host.values())
            out.collective_host_ms = self.comm.issue_ms
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            custom = node.meta.get("custom", {})
            parts = custom.get("parts") or 1
            origin = custom.get("origin", node.name)
            role = node_role(node)
            nbytes = _out_bytes(node, self.unbacked_rows / parts)
            out.out_bytes[node.name] = int(nbytes)
            if host and origin in host:
                out.host_ms[node.name] = host[origin]
            if role == Role.COMM_START:
                out.comm_ms[node.name] = self.comm.ms(collective_kind(node), nbytes)
            elif is_timed(node) and not is_view(node):
                out.compute_ms[node.name] = self._compute_ms(node, parts)
        return out


def source_targets(graph: fx.Graph) -> dict[str, str]:
    return {n.name: str(n.target) for n in graph.nodes if n.op == "call_function"}


def expected_rows(profile: ComputeProfile, graph: fx.Graph) -> float:
    """Average rows one data-dependent size stands for: all-to-all rows over the number of split sizes."""
    rows, sizes = [], 0
    for node in graph.nodes:
        if node_role(node) == Role.COMM_START and collective_kind(node) == "all_to_all":
            splits = [s for s in list(node.args[1] or []) if isinstance(s, fx.Node)]
            if not splits:
                continue
            value = node.meta.get("val")
            row_bytes = value.element_size() * max(1, _numel_static_tail(value))
            rows.append(profile.comm_bytes.get(node.name, 0) / row_bytes / len(splits))
            sizes += 1
    return statistics.median(rows) if rows else 1.0


def _numel_static_tail(value) -> int:
    n = 1
    for size in value.shape[1:]:
        n *= int(size)
    return n
