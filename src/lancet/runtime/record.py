"""What a step program actually executed, in order: its collectives, waits, host copies and compiled regions.

``record_execution`` watches one run: a ``TorchDispatchMode`` sees every
collective start, wait, host copy and host wait as the device is asked to run it,
and every compiled region logs its own call. ``expected_execution`` is the same
sequence read off the graph the program was built from (node order is the
schedule), so comparing the two shows that compiling kept the plan's order: the
collectives start in the same order and each one's window holds the same
regions.

For the compiled executor only: a CUDA-graph replay issues nothing from Python.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from lancet.graph.regions import TO_HOST_OPS, Region
from lancet.graph.roles import COLLECTIVE_KINDS, HOST_WAIT_OPS, WAIT_OPS
from lancet.runtime.program import StepProgram

RECORDED_OPS = {str(op) for op in (*COLLECTIVE_KINDS, *WAIT_OPS)} | HOST_WAIT_OPS | TO_HOST_OPS
"""Ops whose place the plan fixes (collective starts and waits, host copies and waits)."""

Event = tuple[str, object]
"""``("op", name)`` for a recorded op, ``("region", index)`` for a compiled region."""


class _BoundaryLog(TorchDispatchMode):
    """Appends every recorded op to ``log`` as it is dispatched."""

    def __init__(self, log: list[Event]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in RECORDED_OPS:
            self.log.append(("op", name))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_execution(program: StepProgram) -> Iterator[list[Event]]:
    """Record the boundary ops and compiled regions that run inside the block, in order."""
    log: list[Event] = []
    for call in program.calls.values():
        call.log = log
    try:
        with _BoundaryLog(log):
            yield log
    finally:
        for call in program.calls.values():
            call.log = None


def expected_execution(graph: fx.Graph, regions: list[Region], compiled: set[int]) -> list[Event]:
    """The events a program built from ``graph`` must record: boundary ops and compiled regions in graph order."""
    first_node = {r.nodes[0]: r.index for r in regions if r.index in compiled}
    events: list[Event] = []
    for node in graph.nodes:
        if node in first_node:
            events.append(("region", first_node[node]))
        elif node.op == "call_function" and str(node.target) in RECORDED_OPS:
            events.append(("op", str(node.target)))
    return events
