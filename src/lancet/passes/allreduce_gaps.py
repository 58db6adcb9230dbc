"""Fit data-parallel gradient all-reduces into the gaps between backward all-to-alls.

Contract
--------
- Order-only: nodes and values are unchanged; an all-reduce bucket (its
  start node and the views/cat that build its flat buffer) moves earlier, to
  right after the all-to-all whose gap it fills, never before its inputs.
  Waits stay where they are. Gradients are bitwise equal.
- All collectives still follow one order that every rank derives from the same
  costs; the result is checked to be a topological order.

Pseudo-code
-----------
    simulate; for each gap between consecutive backward all-to-alls on the comm lane:
        while some ready bucket has time <= remaining gap:
            place the one closest to the remaining gap right after the earlier all-to-all
    buckets left over: issue right after the last backward all-to-all (or their inputs)

    comm  |== a2a_i ==|=AR=|  |== a2a_i+1 ==|   instead of   |== a2a ==| ... |=AR=|=AR=| at the end
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from lancet.passes.protocol import PassResult
from lancet.capture.trace import TrainGraph
from lancet.cost.model import NodeCosts
from lancet.graph.analysis import Collective, analyze
from lancet.graph.reorder import apply_order
from lancet.graph.roles import is_view
from lancet.sim.simulator import simulate


@dataclass(slots=True)
class AllReduceDecisions:
    after: dict[str, list[str]] = field(default_factory=dict)
    """all-to-all start name -> all-reduce start names issued after it (in order)."""

    def to_json(self) -> dict:
        return {"after": self.after}

    @classmethod
    def from_json(cls, data: dict) -> AllReduceDecisions:
        return cls(after={k: list(v) for k, v in data["after"].items()})


def bucket_chain(start: fx.Node) -> list[fx.Node]:
    """The all-reduce start and the cat/view nodes that only feed it, in graph order."""
    chain = {start}
    todo = list(start.all_input_nodes)
    while todo:
        node = todo.pop()
        if node in chain or node.op != "call_function":
            continue
        builds_buffer = is_view(node) or node.target is torch.ops.aten.cat.default
        if builds_buffer and all(user in chain for user in node.users):
            chain.add(node)
            todo.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _chain_inputs(chain: list[fx.Node]) -> list[fx.Node]:
    members = set(chain)
    return [p for n in chain for p in n.all_input_nodes if p not in members]


def _decide(train_graph: TrainGraph, costs: NodeCosts) -> AllReduceDecisions:
    analysis = analyze(train_graph)
    a2as = analysis.collectives_of("all_to_all", "backward")
    buckets = [c for c in analysis.collectives if c.purpose == "grad_allreduce"]
    if not a2as or not buckets:
        return AllReduceDecisions()
    timeline = simulate(train_graph.graph, costs)
    span = {iv.node: (iv.start, iv.end) for iv in timeline.intervals}
    pos = {n: i for i, n in enumerate(train_graph.graph.nodes)}
    ready_pos = {b: max((pos[p] for p in _chain_inputs(bucket_chain(b.start))), default=0) for b in buckets}
    placed: dict[Collective, Collective] = {}
    decisions = AllReduceDecisions()
    for a2a, following in zip(a2as, a2as[1:] + [None]):
        if following is None:
            leftovers = [b for b in buckets if b not in placed]
            if leftovers:
                decisions.after.setdefault(a2a.start.name, []).extend(b.start.name for b in leftovers)
            break
        remaining = span[following.start.name][0] - span[a2a.start.name][1]
        while remaining > 0:
            ready = [
                b for b in buckets
                if b not in placed and ready_pos[b] < pos[following.start] and costs.comm(b.start) <= remaining
            ]
            if not ready:
                break
            best = min(ready, key=lambda b: (abs(costs.comm(b.start) - remaining), pos[b.start]))
            placed[best] = a2a
            decisions.after.setdefault(a2a.start.name, []).append(best.start.name)
            remaining -= costs.comm(best.start)
    return decisions


def apply_allreduce_decisions(train_graph: TrainGraph, decisions: AllReduceDecisions) -> None:
    """Issue each named bucket right after its all-to-all's start, or right after its last input if later."""
    graph = train_graph.graph
    by_name = {n.name: n for n in graph.nodes}
    unknown = [n for n in [*decisions.after, *(x for v in decisions.after.values() for x in v)] if n not in by_name]
    if unknown:
        raise ValueError(f"all-reduce decisions name nodes the graph does not have: {', '.join(unknown[:5])}")
    chains = {name: bucket_chain(by_name[name]) for names in decisions.after.values() for name in names}
    moving = {n for chain in chains.values() for n in chain}
    pending: list[list[fx.Node]] = []
    order: list[fx.Node] = []
    placed: set[fx.Node] = set()

    def flush() -> None:
        for chain in list(pending):
            if all(p in placed for p in _chain_inputs(chain)):
                order.extend(chain)
                placed.update(chain)
                pending.remove(chain)

    for node in graph.nodes:
        if node in moving:
            continue
        order.append(node)
        placed.add(node)
        for name in decisions.after.get(node.name, ()):
            pending.append(chains[name])
        flush()
    flush()
    if pending:
        raise ValueError("an all-reduce bucket's inputs never became ready")
    apply_order(graph, order)
    train_graph.gm.recompile()


def allreduce_gaps_pass(train_graph: TrainGraph, costs: NodeCosts) -> PassResult[TrainGraph]:
    """Reorder ``train_graph`` in place (see module contract); returns it and the decisions."""
    decisions = _decide(train_graph, costs)
    apply_allreduce_decisions(train_graph, decisions)
    return PassResult(train_graph, decisions)
