"""Two-lane timeline simulator of a step graph.

The graph order is the issue order. The host issues nodes one after another
(``host_ms`` each); a kernel starts once issued and once the compute lane is
free; a host sync (a device-to-host copy) makes the host wait for the device.
A collective is issued on the communication lane when the compute lane
reaches its start node (NCCL's stream waits for everything issued before it)
and when the lane is free (collectives of one group serialise); its wait
blocks the compute lane until it ends. While a collective is in flight,
compute runs ``contention`` times slower; a collective with compute issued
inside its window runs up to ``comm_contention`` times slower.

    compute  |==a==|==b==|        |==d==|==e==|
    comm            |====a2a====|
                                ^ wait(a2a) blocks the compute lane

With each rank's own costs, every rank runs its own lanes; a collective starts
when the last rank reaches it and lasts as long as the slowest rank's share,
so a rank with more work (more tokens for its experts) makes the others wait.

Outputs: makespan, exposed communication (communication time not covered by
compute), the peak of live tensor bytes of the order, and a Chrome trace.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

from torch import fx

from lancet.cost.model import NodeCosts
from lancet.graph.roles import Role, collective_kind, is_view, node_role
from lancet.sim.intervals import subtract, total_length


@dataclass(slots=True)
class Interval:
    node: str
    lane: str
    start: float
    end: float
    kind: str = ""


@dataclass(slots=True)
class Timeline:
    intervals: list[Interval] = field(default_factory=list)
    makespan_ms: float = 0.0
    compute_ms: float = 0.0
    comm_ms: float = 0.0
    exposed_comm_ms: float = 0.0
    exposed_a2a_ms: float = 0.0
    peak_live_bytes: int = 0
    after_ms: float = 0.0
    """Work after the graph that the makespan includes (the optimizer update)."""

    def add_after(self, name: str, ms: float) -> None:
        """Append ``ms`` of work after the graph (on the compute lane) to the timeline and its makespan."""
        self.intervals.append(Interval(name, "compute", self.makespan_ms, self.makespan_ms + ms, name))
        self.makespan_ms += ms
        self.after_ms += ms

    def summary(self) -> dict:
        return {
            "makespan_ms": self.makespan_ms,
            "after_ms": self.after_ms,
            "compute_ms": self.compute_ms,
            "comm_ms": self.comm_ms,
            "exposed_comm_ms": self.exposed_comm_ms,
            "exposed_a2a_ms": self.exposed_a2a_ms,
            "peak_live_bytes": self.peak_live_bytes,
        }

    def chrome_trace(self) -> dict:
        """Chrome/Perfetto trace: pid 0 compute lane, pid 1 communication lane (times in us)."""
        lanes = {"compute": 0, "comm": 1}
        events = [
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"{lane} (predicted)"}}
            for lane, pid in lanes.items()
        ]
        for iv in self.intervals:
            events.append(
                {
                    "ph": "X",
                    "name": iv.node,
                    "cat": iv.kind or iv.lane,
                    "pid": lanes[iv.lane],
                    "tid": 0,
                    "ts": iv.start * 1e3,
                    "dur": max(iv.end - iv.start, 0.0) * 1e3,
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)


def _stretch(
    start: float, work: float, comm: list[tuple[float, float]], factor: float, ends: list[float] | None = None
) -> float:
    """End time of ``work`` ms of compute from ``start`` when it runs ``factor`` slower inside comm intervals.

    ``comm`` is in lane order (ends non-decreasing); ``ends`` may hold their end times already.
    """
    if factor == 1.0 or not comm or work <= 0:
        return start + work
    t, left = start, work
    i = bisect.bisect_right(ends if ends is not None else [end for _, end in comm], t)
    while left > 0:
        if i >= len(comm):
            return t + left
        cstart, cend = comm[i]
        if t < cstart:
            step = min(left, cstart - t)
            t, left = t + step, left - step
            continue
        inside = (cend - t) / factor
        if inside >= left:
            return t + left * factor
        t, left, i = cend, left - inside, i + 1
    return t


def _window_compute(graph: fx.Graph, costs: NodeCosts) -> dict[fx.Node, float]:
    """For each collective start, the compute cost issued between it and its wait (what runs beside it)."""
    open_windows: dict[fx.Node, float] = {}
    result: dict[fx.Node, float] = {}
    for node in graph.nodes:
        role = node_role(node)
        if role == Role.COMM_START:
            open_windows[node] = 0.0
        elif role == Role.COMM_WAIT:
            for start in node.all_input_nodes:
                if start in open_windows:
                    result[start] = open_windows.pop(start)
        elif role in (Role.COMPUTE, Role.HOST_SYNC):
            cost = costs.compute(node)
            for start in open_windows:
                open_windows[start] += cost
    result.update(open_windows)
    return result


def _comm_duration(node: fx.Node, costs: NodeCosts, beside: float) -> float:
    """A collective's time, stretched by ``comm_contention`` over the part that runs beside compute."""
    base = costs.comm(node)
    if base <= 0 or costs.comm_contention == 1.0:
        return base
    shared = min(1.0, beside / base)
    return base * (1.0 + (costs.comm_contention - 1.0) * shared)


@dataclass(slots=True)
class _Rank:
    """One rank's lanes while the simulation walks the graph."""

    costs: NodeCosts
    beside: dict[fx.Node, float]
    timeline: Timeline = field(default_factory=Timeline)
    ready: dict[fx.Node, float] = field(default_factory=dict)
    comm_busy: list[tuple[float, float]] = field(default_factory=list)
    comm_ends: list[float] = field(default_factory=list)
    compute_ivs: list[tuple[float, float]] = field(default_factory=list)
    a2a_ivs: list[tuple[float, float]] = field(default_factory=list)
    host: float = 0.0
    compute_free: float = 0.0
    comm_free: float = 0.0

    def inputs_ready(self, node: fx.Node) -> float:
        return max((self.ready.get(p, 0.0) for p in node.all_input_nodes), default=0.0)

    def arrive(self, node: fx.Node) -> float:
        """When this rank can start collective ``node``: issued, its inputs ready, both lanes there."""
        self.host += self.costs.collective_host_ms
        return max(self.comm_free, self.compute_free, self.inputs_ready(node), self.host)

    def collective(self, node: fx.Node, arrived: float, start: float, end: float) -> None:
        self.comm_free = end
        self.comm_busy.append((start, end))
        self.comm_ends.append(end)
        kind = collective_kind(node)
        if start > arrived:
            self.timeline.intervals.append(Interval(node.name, "comm", arrived, start, "waiting for other ranks"))
        self.timeline.intervals.append(Interval(node.name, "comm", start, end, kind))
        if "all_to_all" in kind:
            self.a2a_ivs.append((start, end))
        self.ready[node] = end

    def local(self, node: fx.Node, role: Role) -> None:
        """Every node that is not a collective start."""
        costs, inputs_ready = self.costs, self.inputs_ready(node)
        if role == Role.COMM_WAIT:
            self.compute_free = max(self.compute_free, inputs_ready)
            self.ready[node] = self.compute_free
        elif role == Role.HOST_WAIT:
            self.host = max(self.host + costs.host(node), inputs_ready)  # the host waits; the device does not
            self.ready[node] = self.host
        elif role in (Role.COMPUTE, Role.HOST_SYNC):
            if node.op == "call_function":
                self.host += costs.host(node)
            cost = costs.compute(node)
            start = max(self.compute_free, inputs_ready, self.host)
            end = _stretch(start, cost, self.comm_busy, costs.contention, self.comm_ends)
            if cost > 0:
                self.timeline.intervals.append(Interval(node.name, "compute", start, end, str(node.target)))
                self.compute_ivs.append((start, end))
                self.compute_free = end
            self.ready[node] = end if cost > 0 else start
            if role == Role.HOST_SYNC:
                self.host = max(self.host, end)  # the host waits for the device value
        else:
            self.ready[node] = 0.0 if role == Role.INPUT else self.compute_free

    def finish(self) -> Timeline:
        timeline = self.timeline
        timeline.makespan_ms = max(self.compute_free, self.comm_free, self.host)
        timeline.compute_ms = total_length(self.compute_ivs)
        timeline.comm_ms = total_length(self.comm_busy)
        timeline.exposed_comm_ms = total_length(subtract(self.comm_busy, self.compute_ivs))
        timeline.exposed_a2a_ms = total_length(subtract(self.a2a_ivs, self.compute_ivs))
        return timeline


def simulate(graph: fx.Graph, costs: NodeCosts) -> Timeline:
    """Simulate ``graph`` in its current node order under ``costs``.

    With per-rank costs (``costs.ranks``) every rank runs its own lanes and a
    collective starts only when the last rank reaches it, then takes the
    longest of the ranks' durations (ranks wait for each other: rank skew).
    The result is the timeline of the rank that finishes last.
    """
    ranks = [_Rank(c, _window_compute(graph, c)) for c in (costs.ranks or [costs])]
    for node in graph.nodes:
        role = node_role(node)
        if role == Role.COMM_START:
            arrived = [rank.arrive(node) for rank in ranks]
            start = max(arrived)
            end = start + max(_comm_duration(node, rank.costs, rank.beside.get(node, 0.0)) for rank in ranks)
            for rank, t in zip(ranks, arrived):
                rank.collective(node, t, start, end)
        else:
            for rank in ranks:
                rank.local(node, role)
    last = max((rank.finish() for rank in ranks), key=lambda t: t.makespan_ms)
    last.peak_live_bytes = peak_live_bytes(graph, costs.out_bytes)
    return last


def _storage_root(node: fx.Node) -> fx.Node:
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def peak_live_bytes(graph: fx.Graph, out_bytes: dict[str, int]) -> int:
    """Peak over the order of the bytes of tensors alive (produced, with a later use; outputs live to the end).

    Views own no memory; a use of a view keeps its storage's producer alive.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for producer in node.all_input_nodes:
            root = _storage_root(producer)
            last_use[root] = max(last_use.get(root, 0), position[node])
    delta = [0] * (len(nodes) + 1)
    for node in nodes:
        if node.op == "placeholder" or _storage_root(node) is not node:
            continue
        size = out_bytes.get(node.name, 0)
        if size == 0 or node not in last_use:
            continue
        delta[position[node]] += size
        delta[last_use[node] + 1] -= size
    peak = live = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak
