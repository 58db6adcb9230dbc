"""What a step program actually executed, in order: its collectives, waits, host copies and compiled regions.

``record_execution`` runs a block under ``torch.profiler`` (CPU activity) and
reads off the order in which the host issued every collective start, wait, host
copy and host wait (the profiler's op events) and every compiled region (the
``lancet/region/<index>`` range its call opens). ``expected_execution`` is the
same sequence read off the graph the program was built from (node order is the
schedule). Equal sequences show that compiling kept the plan: the collectives
start in the same order and each one's window holds the same regions.

The profiler rather than a ``TorchDispatchMode``: ``torch.compile`` refuses to run
compiled code under a dispatch mode, so a mode would change what it watches.
For the compiled executor: a CUDA-graph replay issues nothing from the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx

from lancet.graph.regions import Region
from lancet.graph.roles import COLLECTIVE_KINDS, HOST_WAIT_OPS, TO_HOST_OPS, WAIT_OPS
from lancet.runtime.program import REGION_ANNOTATION

RECORDED_OPS = {*COLLECTIVE_KINDS, *WAIT_OPS, *HOST_WAIT_OPS, *TO_HOST_OPS}
"""Ops whose place the plan fixes (collective starts and waits, host copies and waits)."""

Event = tuple[str, object]
"""``("op", "ns::name")`` for a recorded op, ``("region", index)`` for a compiled region's call."""


def _profiler_name(op) -> str:
    """``ns::name``: how the profiler names an op's event."""
    return op._schema.name


_RECORDED = {_profiler_name(name) for name in RECORDED_OPS}
_REGION_PREFIX = REGION_ANNOTATION.format(index="")


def _events(prof: torch.profiler.profile) -> list[Event]:
    found = []
    for event in prof.events():
        if event.name in _RECORDED:
            found.append((event.time_range.start, ("op", event.name)))
        elif event.name.startswith(_REGION_PREFIX):
            found.append((event.time_range.start, ("region", int(event.name[len(_REGION_PREFIX):]))))
    return [item for _, item in sorted(found, key=lambda pair: pair[0])]


@contextlib.contextmanager
def record_execution() -> Iterator[list[Event]]:
    """Record, in issue order, the boundary ops and compiled regions that run inside the block.

    The list is filled when the block ends.
    """
    log: list[Event] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield log
    log.extend(_events(prof))


def expected_execution(graph: fx.Graph, regions: list[Region], compiled: set[int]) -> list[Event]:
    """The events a program built from ``graph`` must record: boundary ops and compiled regions in graph order."""
    first_node = {r.nodes[0]: r.index for r in regions if r.index in compiled}
    events: list[Event] = []
    for node in graph.nodes:
        if node in first_node:
            events.append(("region", first_node[node]))
        elif node.op == "call_function" and node.target in RECORDED_OPS:
            events.append(("op", _profiler_name(node.target)))
    return events
