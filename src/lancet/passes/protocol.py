"""One shape for every pass, and the runner that applies a list of them.

A pass is a function ``(graph, costs) -> PassResult``:

- ``graph``: the graph it rewrites, a captured step (``TrainGraph``) or forward
  (``ForwardGraph``); anything holding an ``fx.GraphModule`` as ``.gm``.
- ``costs``: the ``NodeCosts`` of that graph for passes that price their
  choices, ``None`` for the others. Settings of one pass (a memory cap, the
  regions to partition) are bound with ``functools.partial`` when a pipeline is
  built, so the runner knows nothing about them.
- ``PassResult(graph, decisions)``: the graph after the pass and what the pass
  decided (serialisable decisions, a count of moved nodes, or None). Whether the
  pass rewrote the graph it was given or a copy is declared by the ``Pass``
  entry (``in_place``); an order-only pass keeps the node set and every value.

``run_passes`` applies a list of ``Pass`` entries in order; after each it lints
the graph, recompiles its module, checks that an order-only pass kept the node
set, and logs a diff (node count and how many nodes changed place) to the
``lancet.passes`` logger at INFO level (``lancet optimize --log-passes`` shows it)
and to an optional callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import fx

G = TypeVar("G")
_LOG = logging.getLogger("lancet.passes")


@dataclass(frozen=True, slots=True)
class PassResult(Generic[G]):
    graph: G
    """The graph after the pass (the same object for an in-place pass)."""
    decisions: Any = None
    """What the pass decided (re-applicable decisions, a count, or None)."""

    def __iter__(self) -> Iterator:
        """``graph, decisions = some_pass(...)``."""
        return iter((self.graph, self.decisions))


PassFn = Callable[[Any, Any], PassResult]


@dataclass(frozen=True, slots=True)
class Pass:
    """A listed pass: its name, its function, and what it promises."""

    name: str
    run: PassFn
    in_place: bool
    """Rewrites the graph it is given (else returns a new graph and leaves its input as it was)."""
    order_only: bool
    """Keeps the node set and every value; only the order changes."""


@dataclass(slots=True)
class PipelineResult(Generic[G]):
    graph: G
    decisions: dict[str, Any] = field(default_factory=dict)
    """Pass name -> its decisions."""
    log: list[str] = field(default_factory=list)
    """One line per pass: what changed."""


class PassContractError(RuntimeError):
    """A pass broke the promise its entry makes (an order-only pass changed the node set, a bad return)."""


def _module(graph) -> fx.GraphModule:
    gm = getattr(graph, "gm", None)
    if not isinstance(gm, fx.GraphModule):
        raise PassContractError(f"a pass graph must hold an fx.GraphModule as .gm, got {type(graph).__name__}")
    return gm


def graph_diff(before: list[str], after: list[str]) -> str:
    """Node count change, nodes added/removed, nodes of both whose relative order changed."""
    kept = set(before) & set(after)
    old = [n for n in before if n in kept]
    new = [n for n in after if n in kept]
    previous = dict(zip(old[1:], old))
    moved = sum(1 for a, b in zip(new[1:], new) if previous.get(a) != b)
    return (f"{len(before)} -> {len(after)} nodes (+{len(set(after) - kept)} -{len(set(before) - kept)}), "
            f"{moved} kept nodes after another node than before")


def run_passes(
    graph: G, passes: Sequence[Pass], costs: Callable[[fx.Graph], Any] | None = None, *,
    log: Callable[[str], None] | None = None,
) -> PipelineResult[G]:
    """Apply ``passes`` in order to ``graph`` (see the module docstring); ``costs(graph)`` prices each input."""
    result = PipelineResult(graph)
    for entry in passes:
        gm = _module(result.graph)
        before = [n.name for n in gm.graph.nodes]
        out = entry.run(result.graph, None if costs is None else costs(gm.graph))
        if not isinstance(out, PassResult):
            raise PassContractError(f"pass {entry.name} returned {type(out).__name__}, not a PassResult")
        if entry.in_place and out.graph is not result.graph:
            raise PassContractError(f"pass {entry.name} is listed in place but returned another graph")
        new_gm = _module(out.graph)
        new_gm.graph.lint()
        new_gm.recompile()
        after = [n.name for n in new_gm.graph.nodes]
        if entry.order_only and sorted(before) != sorted(after):
            raise PassContractError(f"order-only pass {entry.name} changed the node set")
        line = f"{entry.name}: {graph_diff(before, after)}"
        result.log.append(line)
        _LOG.info(line)
        if log is not None:
            log(line)
        result.graph, result.decisions[entry.name] = out.graph, out.decisions
    return result
