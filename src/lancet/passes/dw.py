"""dW scheduling: run weight-gradient work while backward all-to-alls are in flight.

Contract
--------
- Order-only: the node set, every node's arguments and so every value are
  unchanged; only positions of dW nodes change. Gradients are bitwise equal.
- A dW node (``GraphAnalysis.dw_overlap``) has no ordering relative to some
  backward all-to-all; it is moved only into the window (between start and
  wait) of such an all-to-all, so no dependency is broken. The result is
  checked to be a topological order; a violation raises, never degrades.
- Collectives are not moved: every rank issues them in the same order.
- Nodes not chosen stay where autograd put them.
- With ``memory_cap_bytes``, a move is refused when the estimated extra bytes
  held alive by all moves (inputs kept until a deferred node runs, outputs
  made earlier by a hoisted node) would exceed the cap at any point.

Pseudo-code (Lancet's greedy, per backward all-to-all X in graph order)
-----------------------------------------------------------------------
    remaining = comm_ms(X); k = 0
    loop:
        cand = available dW group closest in cost to `remaining`
               (a group: a dW node plus the dW neighbours that must move with it)
        stop if none, or cost(cand) > 2 * remaining and k > 0
        place cand right after X's start; remaining -= cost(cand); k += 1
        stop if remaining <= 0
    forced: every unplaced dW whose last overlappable all-to-all is X goes into X too

    compute |..dX..|[dW dW dW]|..dX..|
    comm           |==== X ====|
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from lancet.passes.protocol import PassResult
from lancet.capture.trace import TrainGraph
from lancet.cost.model import NodeCosts
from lancet.graph.analysis import Collective, GraphAnalysis, analyze
from lancet.graph.reorder import apply_order
from lancet.graph.roles import is_view


@dataclass(slots=True)
class DwDecisions:
    """Which dW nodes run in which backward all-to-all's window, in order."""

    windows: dict[str, list[str]] = field(default_factory=dict)
    """all-to-all start node name -> dW node names placed right after it."""
    extra_bytes_peak: int = 0
    """Estimated peak of extra bytes held alive by the moves."""

    def to_json(self) -> dict:
        return {"windows": self.windows, "extra_bytes_peak": self.extra_bytes_peak}

    @classmethod
    def from_json(cls, data: dict) -> DwDecisions:
        return cls(windows={k: list(v) for k, v in data["windows"].items()}, extra_bytes_peak=data.get("extra_bytes_peak", 0))

    @property
    def num_moved(self) -> int:
        return sum(len(v) for v in self.windows.values())


class _HeldBytes:
    """Extra bytes held by moves, as intervals over original positions; answers the peak."""

    def __init__(self) -> None:
        self.intervals: list[tuple[int, int, int]] = []

    def peak_with(self, extra: list[tuple[int, int, int]]) -> int:
        events: list[tuple[int, int]] = []
        for start, end, size in self.intervals + extra:
            if size > 0 and end > start:
                events += [(start, size), (end, -size)]
        live = peak = 0
        for _, delta in sorted(events):
            live += delta
            peak = max(peak, live)
        return peak


class _DwScheduler:
    def __init__(self, analysis: GraphAnalysis, costs: NodeCosts, memory_cap_bytes: int | None) -> None:
        self.analysis = analysis
        self.costs = costs
        self.cap = memory_cap_bytes
        self.nodes = list(analysis.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.windows = analysis.dw_overlap
        self.assigned: dict[fx.Node, Collective] = {}
        self.order_of_a2a: dict[Collective, int] = {}
        self.held = _HeldBytes()
        self.placements: dict[Collective, list[fx.Node]] = {}
        self.last_use = self._last_uses()

    def _last_uses(self) -> dict[fx.Node, fx.Node]:
        last: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            for producer in node.all_input_nodes:
                last[producer] = node
        return last

    def cost(self, group: list[fx.Node]) -> float:
        return sum(self.costs.compute(n) for n in group)

    def group_for(self, node: fx.Node, a2a: Collective) -> list[fx.Node] | None:
        """``node`` plus the unplaced dW nodes that must move with it into ``a2a``'s window, or None if it cannot."""
        anchor = self.pos[a2a.start]
        group: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n in group:
                continue
            if n in self.assigned or a2a not in self.windows.get(n, ()):
                return None
            group.add(n)
            for producer in n.all_input_nodes:
                if self.pos[producer] <= anchor or producer in self.assigned:
                    continue
                if producer not in self.windows:
                    return None  # e.g. the wait of a collective issued after this window (parallel parts)
                todo.append(producer)
            for consumer in n.users:
                moved_to = self.assigned.get(consumer)
                if moved_to is not None and self.order_of_a2a[moved_to] < self.order_of_a2a[a2a]:
                    return None
                if moved_to is not None or self.pos[consumer] > anchor:
                    continue
                if consumer not in self.windows:
                    return None  # e.g. a collective issued before this window reads it
                todo.append(consumer)
        return sorted(group, key=self.pos.__getitem__)

    def held_bytes(self, group: list[fx.Node], a2a: Collective) -> list[tuple[int, int, int]]:
        anchor = self.pos[a2a.start]
        extra = []
        for n in group:
            here = self.pos[n]
            if here < anchor:  # deferred: inputs whose last use is n stay alive until anchor
                size = sum(self.costs.out_bytes.get(p.name, 0) for p in n.all_input_nodes if self.last_use.get(p) is n)
                extra.append((here, anchor, size))
            else:  # hoisted: n's output exists from anchor on
                extra.append((anchor, here, self.costs.out_bytes.get(n.name, 0)))
        return extra

    def fits_memory(self, extra: list[tuple[int, int, int]]) -> bool:
        return self.cap is None or self.held.peak_with(extra) <= self.cap

    def place(self, group: list[fx.Node], a2a: Collective, extra: list[tuple[int, int, int]]) -> None:
        for n in group:
            self.assigned[n] = a2a
        self.placements.setdefault(a2a, []).extend(group)
        self.held.intervals.extend(extra)

    def candidates(self, a2a: Collective, rejected: set[fx.Node]) -> list[tuple[float, fx.Node, list[fx.Node]]]:
        """(cost, root, group) for every unplaced non-view dW node that can move into ``a2a``'s window."""
        found = []
        for node, windows in self.windows.items():
            if node in self.assigned or node in rejected or is_view(node) or a2a not in windows:
                continue
            group = self.group_for(node, a2a)
            if group is not None:
                found.append((self.cost(group), node, group))
        return found

    def fill(self, a2a: Collective) -> None:
        remaining = self.costs.comm(a2a.start)
        placed = 0
        rejected: set[fx.Node] = set()
        while remaining > 0:
            options = self.candidates(a2a, rejected)
            if not options:
                return
            cost, root, group = min(options, key=lambda o: (abs(o[0] - remaining), self.pos[o[1]]))
            if cost > 2 * remaining and placed > 0:
                return
            extra = self.held_bytes(group, a2a)
            if not self.fits_memory(extra):
                rejected.add(root)
                continue
            self.place(group, a2a, extra)
            remaining -= cost
            placed += 1

    def force_last_chance(self, a2a: Collective) -> None:
        for node, windows in self.windows.items():
            if node in self.assigned or windows[-1] is not a2a:
                continue
            group = self.group_for(node, a2a)
            if group is None:
                continue
            extra = self.held_bytes(group, a2a)
            if self.fits_memory(extra):
                self.place(group, a2a, extra)

    def run(self, force: bool) -> DwDecisions:
        a2as = [c for c in self.analysis.collectives_of("all_to_all", "backward")]
        for i, a2a in enumerate(a2as):
            self.order_of_a2a[a2a] = i
        for a2a in a2as:
            self.fill(a2a)
            if force:
                self.force_last_chance(a2a)
        windows = {
            a2a.start.name: [n.name for n in sorted(group, key=self.pos.__getitem__)]
            for a2a, group in self.placements.items()
        }
        return DwDecisions(windows=windows, extra_bytes_peak=self.held.peak_with([]))


def apply_dw_decisions(train_graph: TrainGraph, decisions: DwDecisions) -> None:
    """Move the named dW nodes right after their all-to-all's start (in place); raises on an invalid order."""
    graph = train_graph.graph
    by_name = {n.name: n for n in graph.nodes}
    missing = [name for name in decisions.windows if name not in by_name] + [
        n for names in decisions.windows.values() for n in names if n not in by_name
    ]
    if missing:
        raise ValueError(f"dW decisions name nodes the graph does not have: {', '.join(missing[:5])}")
    moved = {by_name[n] for names in decisions.windows.values() for n in names}
    order: list[fx.Node] = []
    for node in graph.nodes:
        if node in moved:
            continue
        order.append(node)
        for name in decisions.windows.get(node.name, ()):
            order.append(by_name[name])
    apply_order(graph, order)
    train_graph.gm.recompile()


def dw_pass(
    train_graph: TrainGraph,
    costs: NodeCosts,
    *,
    memory_cap_bytes: int | None = None,
    force_last_chance: bool = True,
) -> PassResult[TrainGraph]:
    """Reorder ``train_graph`` in place (see module contract); returns it and the decisions."""
    analysis = analyze(train_graph)
    decisions = _DwScheduler(analysis, costs, memory_cap_bytes).run(force_last_chance)
    apply_dw_decisions(train_graph, decisions)
    return PassResult(train_graph, decisions)
