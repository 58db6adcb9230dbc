"""Costs for graphs a pass created, priced from the profile of the graph it started from.

A partitioned graph has nodes the profile never timed: per-part copies of
profiled nodes, gathers and slices between them, and the backward autograd
derives for them. This model prices them without running anything:

- a node copied from a profiled node (``meta["custom"]["origin"]``) costs the
  original's time divided by its number of parts, but never less than the
  fastest kernel of that op (small kernels do not get faster when split);
  a whole copy costs the original's time; host issue time is the original's
  (scaled so that the profiled graph's host time matches its measured whole-graph
  issue time, ``lancet.cost.model.host_scale``);
- any other node is priced from its work: floating-point operations for
  matrix products and attention, bytes read and written for everything else;
  its time is interpolated linearly between the profiled nodes of that op with
  the nearest smaller and larger work; beyond the largest, at the largest one's
  rate (for memory-bound ops far beyond it, at most at the bandwidth the large
  memory-bound ops reached: a tiny profiled cumsum says nothing about a large
  one); the op's fastest profiled kernel is the floor; ops never profiled are
  priced by bytes at that bandwidth;
- collectives are priced on the comm curves from their output bytes, scaled
  per kind by how the profiled graph's measured collectives compared with the
  curves (median of measured / curve over collectives of at least 0.05 ms).

Sizes come from the nodes' fake values. A data-dependent size (rows behind one
all-to-all split) is taken as the profiled average, divided by the number of
parts of the partition that made it.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field

import torch
from torch import fx

from lancet.cost.comm import CommProfile
from lancet.cost.model import NodeCosts, host_scale
from lancet.cost.profile import ComputeProfile, is_timed
from lancet.graph import meta, ops
from lancet.graph.roles import Role, collective_kind, is_view, node_role


class Sizes:
    """Numbers of elements of fake values, with data-dependent sizes replaced by expectations."""

    def __init__(self, graph: fx.Graph, rows_per_size: float) -> None:
        self.rows_per_size = rows_per_size
        self.parts_of: dict[object, int] = {}
        for node in graph.nodes:
            value = node.meta.get("val")
            if isinstance(value, torch.SymInt):
                parts = meta.get(node, meta.PARTS) or 1
                for symbol in value.node.expr.free_symbols:  # later (backward) uses carry no part marks
                    self.parts_of[symbol] = max(self.parts_of.get(symbol, 1), parts)

    def dim(self, size) -> float:
        if isinstance(size, int):
            return float(size)
        expr = getattr(getattr(size, "node", None), "expr", None)
        if expr is None:
            return self.rows_per_size
        return sum(self.rows_per_size / self.parts_of.get(s, 1) for s in expr.free_symbols) or float(expr)

    def numel(self, value) -> float:
        if not isinstance(value, torch.Tensor):
            return 0.0
        n = 1.0
        for size in value.shape:
            n *= self.dim(size)
        return n

    def nbytes(self, value) -> float:
        values = value if isinstance(value, (tuple, list)) else [value]
        return sum(self.numel(v) * v.element_size() for v in values if isinstance(v, torch.Tensor))


def _val(arg):
    return arg.meta.get("val") if isinstance(arg, fx.Node) else None


_FLOP_OPS = ops.MATMUL | ops.ATTENTION_FORWARD | ops.ATTENTION_BACKWARD


def _matmul_flops(node: fx.Node, sizes: Sizes) -> float | None:
    """Floating-point operations of matrix products and attention (None for other ops)."""
    target = node.target
    args = [_val(a) for a in node.args]
    shape = lambda t: [sizes.dim(s) for s in t.shape]  # noqa: E731
    if target in ops.MM:
        a, b = args[-2], args[-1]
        (m, k), (_, n) = shape(a), shape(b)
        return 2 * m * k * n
    if target == ops.BMM:
        (batch, m, k), (_, _, n) = shape(args[0]), shape(args[1])
        return 2 * batch * m * k * n
    if target == ops.GROUPED_MM:
        (rows, k), (_, _, n) = shape(args[0]), shape(args[1])
        return 2 * rows * k * n
    if target == ops.GROUPED_MM_DW:
        (rows, k), (_, n) = shape(args[0]), shape(args[1])
        return 2 * rows * k * n
    if target in ops.ATTENTION_FORWARD or target in ops.ATTENTION_BACKWARD:
        q, k = args[0], args[1]
        if q is None or k is None or q.dim() != 4:
            return None
        batch, heads, sq, d = shape(q)
        sk = shape(k)[2] if k.dim() == 4 else sq
        return 4 * batch * heads * sq * sk * d * (2.5 if target in ops.ATTENTION_BACKWARD else 1.0)
    return None


def _bytes_moved(node: fx.Node, sizes: Sizes) -> float:
    inputs = sum(sizes.nbytes(_val(a)) for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor))
    return inputs + sizes.nbytes(node.meta.get("val"))


def work(node: fx.Node, sizes: Sizes) -> float:
    """FLOPs for matrix products and attention, bytes moved otherwise."""
    flops = _matmul_flops(node, sizes)
    return flops if flops is not None else _bytes_moved(node, sizes)


@dataclass(slots=True)
class _Rate:
    """Measured (work, ms) samples of one op; prices work between them by linear interpolation."""

    samples: list[tuple[float, float]]
    """(units, ms): the median ms per distinct units, sorted by units."""
    floor_ms: float
    bandwidth_rate: float | None = None
    """ms per unit for memory-bound work far beyond the largest sample (None: the largest sample's rate)."""

    @classmethod
    def of(cls, points: list[tuple[float, float]], bandwidth_rate: float | None) -> _Rate:
        by_units: dict[float, list[float]] = {}
        for units, ms in points:
            by_units.setdefault(units, []).append(ms)
        samples = sorted((u, statistics.median(v)) for u, v in by_units.items())
        return cls(samples, min(ms for _, ms in points), bandwidth_rate)

    def ms(self, units: float) -> float:
        if not self.samples:
            return max(units * (self.bandwidth_rate or 0.0), self.floor_ms)
        i = bisect.bisect_left(self.samples, units, key=lambda sample: sample[0])
        if i == 0:
            u0, ms0 = self.samples[0]
            return max(ms0 * units / u0, self.floor_ms)
        if i == len(self.samples):
            u1, ms1 = self.samples[-1]
            rate = ms1 / u1
            if self.bandwidth_rate is not None and units > _FAR * u1:
                rate = min(rate, self.bandwidth_rate)  # a tiny profiled cumsum says nothing about a large one
            return max(units * rate, self.floor_ms)
        (u0, ms0), (u1, ms1) = self.samples[i - 1], self.samples[i]
        return max(ms0 + (ms1 - ms0) * (units - u0) / (u1 - u0), self.floor_ms)


_FAR = 4.0
"""Memory-bound work more than this many times the largest profiled node of its op is priced at no more
than the bandwidth the large memory-bound ops reached."""


def _fit(profile: ComputeProfile, graph: fx.Graph, sizes: Sizes) -> tuple[dict[object, _Rate], _Rate]:
    samples: dict[object, list[tuple[float, float]]] = {}
    for node in graph.nodes:
        ms = profile.node_ms.get(node.name)
        if ms is None or node.op != "call_function":
            continue
        units = work(node, sizes)
        if units > 0:
            samples.setdefault(node.target, []).append((units, ms))
    # Ops the profile never saw, and memory-bound ops far beyond their samples, are priced by bytes moved at
    # the bandwidth the large memory-bound ops reached.
    memory = sorted(pt for op, pts in samples.items() if op not in _FLOP_OPS for pt in pts)
    large = memory[len(memory) // 2 :] or [(1.0, 0.0)]
    bandwidth_rate = sum(ms for _, ms in large) / max(sum(u for u, _ in large), 1.0)
    floor = min((ms for _, ms in memory), default=0.0)
    rates = {}
    for op, pts in samples.items():
        memory_bound = op not in _FLOP_OPS
        rates[op] = _Rate.of(pts, bandwidth_rate if memory_bound else None)
    return rates, _Rate([], floor, bandwidth_rate)


@dataclass(slots=True)
class DerivedCostModel:
    """Prices a rewritten graph from the profile of its source graph (see module docstring)."""

    profile: ComputeProfile
    comm: CommProfile
    source_graph: fx.Graph
    rows_per_size: float
    """Expected rows behind one data-dependent size of the unpartitioned graph."""
    model_host: bool = True
    _rates: dict[object, _Rate] = field(default_factory=dict)
    _default: _Rate | None = None
    _targets: dict[str, object] = field(default_factory=dict)

    _comm_scale: dict[str, float] = field(default_factory=dict)
    _host_scale: float = 1.0

    @classmethod
    def of_captured(
        cls, profile: ComputeProfile, comm: CommProfile, captured: fx.Graph, model_host: bool
    ) -> DerivedCostModel:
        """The model for rewrites of ``captured``, the graph ``profile`` was measured on."""
        return cls(profile, comm, captured, expected_rows(profile, captured), model_host=model_host)

    def __post_init__(self) -> None:
        self._rates, self._default = _fit(self.profile, self.source_graph, Sizes(self.source_graph, self.rows_per_size))
        self._comm_scale = comm_scale(self.profile, self.comm)
        self._targets = {n.name: n.target for n in self.source_graph.nodes if n.op == "call_function"}
        self._host_scale = host_scale(self.profile, self.comm, self.source_graph)

    @staticmethod
    def _origin(node: fx.Node, partitioned: bool) -> str | None:
        """The profiled node this one stands for: its recorded origin, or (unless new) itself by name.

        In a step graph captured from a partitioned forward, backward nodes are new even where their
        names coincide with profiled ones; forward nodes outside the partitions keep their names.
        """
        custom = meta.custom(node)
        if meta.ORIGIN in custom:
            return custom[meta.ORIGIN]
        if partitioned and custom.get(meta.PHASE) != meta.FORWARD:
            return None
        return node.name

    def _compute_ms(self, node: fx.Node, sizes: Sizes, partitioned: bool) -> float:
        custom = meta.custom(node)
        origin, part, parts = self._origin(node, partitioned), custom.get(meta.PART), custom.get(meta.PARTS) or 1
        rate = self._rates.get(node.target, self._default)
        if origin in self.profile.node_ms and self._targets.get(origin) == node.target:
            base = self.profile.node_ms[origin]
            return base if part is None else max(base / parts, rate.floor_ms)
        return rate.ms(work(node, sizes))

    def costs(self, graph: fx.Graph) -> NodeCosts:
        sizes = Sizes(graph, self.rows_per_size)
        out = NodeCosts(contention=self.comm.contention, comm_contention=self.comm.comm_contention)
        host = self.profile.host_ms if self.model_host else {}
        if host:
            out.default_host_ms = statistics.median(host.values()) * self._host_scale
            out.collective_host_ms = self.comm.issue_ms
        partitioned = any(meta.PARTS in meta.custom(n) for n in graph.nodes)
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            origin = self._origin(node, partitioned)
            nbytes = sizes.nbytes(node.meta.get("val"))
            out.out_bytes[node.name] = int(nbytes)
            if host and origin in host:
                out.host_ms[node.name] = host[origin] * self._host_scale
            if node_role(node) == Role.COMM_START:
                kind = collective_kind(node)
                out.comm_ms[node.name] = self.comm.ms(kind, nbytes) * self._comm_scale.get(kind, 1.0)
            elif is_timed(node) and not is_view(node):
                out.compute_ms[node.name] = self._compute_ms(node, sizes, partitioned)
        return out


def comm_scale(profile: ComputeProfile, comm: CommProfile, min_ms: float = 0.05) -> dict[str, float]:
    """Per collective kind: median of measured time over curve time across the profiled graph's collectives."""
    ratios: dict[str, list[float]] = {}
    for name, measured in profile.comm_ms.items():
        kind, nbytes = profile.comm_kind.get(name), profile.comm_bytes.get(name)
        if kind is None or nbytes is None or kind not in comm.curves:
            continue
        curve = comm.ms(kind, nbytes)
        if curve >= min_ms and measured > 0:
            ratios.setdefault(kind, []).append(measured / curve)
    return {kind: statistics.median(r) for kind, r in ratios.items()}


def expected_rows(profile: ComputeProfile, graph: fx.Graph) -> float:
    """Average rows one data-dependent size stands for: all-to-all rows over the number of split sizes."""
    rows = []
    for node in graph.nodes:
        if node_role(node) != Role.COMM_START or collective_kind(node) != "all_to_all":
            continue
        splits = [s for s in list(node.args[1] or []) if isinstance(s, fx.Node)]
        value = node.meta.get("val")
        if not splits or not isinstance(value, torch.Tensor):
            continue
        row_bytes = value.element_size()
        for size in value.shape[1:]:
            row_bytes *= int(size)
        rows.append(profile.comm_bytes.get(node.name, 0) / row_bytes / len(splits))
    return statistics.median(rows) if rows else 1.0
