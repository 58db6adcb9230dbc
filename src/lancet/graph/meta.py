"""The node metadata lancet writes and reads: one schema, no string literals elsewhere.

Everything lives under ``node.meta[CUSTOM]`` (the dict ``torch.fx.traceback.annotate``
fills while tracing, and that graph copies keep):

| key          | written by                        | value                                           |
|--------------|-----------------------------------|-------------------------------------------------|
| ``PHASE``    | the step function (trace time)    | ``FORWARD`` / ``BACKWARD``                      |
| ``MODULE``   | capture (trace time)              | qualified name of the module that made the node |
| ``MOE_STAGE``| the MoE layer, ``dispatch_region``| ``GATE`` / ``DISPATCH``                         |
| ``PART``     | the partition rewrite             | part index of a per-part copy, None when whole  |
| ``PARTS``    | the partition rewrite             | number of parts of the node's region            |
| ``ORIGIN``   | the partition rewrite             | name of the node a copy was made from           |
| ``REGION``   | the partition rewrite             | index of the partitioned region a node belongs to |
| ``TOKEN_ROWS``| the partition rewrite            | an all-to-all copy carries token rows (copies have no fake value to tell) |
| ``UNIT``     | ``separate_region`` (trace time)  | a label: compiled regions never mix nodes of two labels |

This module is a leaf (it imports nothing from lancet), so the layers that
write metadata while tracing (moe, step, capture) and those that read it
(graph, cost, passes, runtime) share it.

``dispatch_region()`` is the public marker of a MoE layer's dispatch stage:
wrap everything from the routing decision being applied (sort by destination,
capacity slots) to the combine in it. The stage must be row-local: each
token's output depends only on its own row and routing, so a partition may run
it on any subset of the tokens. Unmarked layers are found from their
all-to-alls (``lancet.graph.analysis``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import fx
from torch.fx import traceback as fx_traceback

CUSTOM = "custom"

PHASE = "phase"
FORWARD, BACKWARD = "forward", "backward"
MODULE = "module"
MOE_STAGE = "moe_stage"
GATE, DISPATCH = "gate", "dispatch"
PART = "part"
PARTS = "parts"
ORIGIN = "origin"
REGION = "region"
TOKEN_ROWS = "token_rows"
UNIT = "unit"


def custom(node: fx.Node) -> dict:
    """The node's lancet metadata (empty when it has none); read-only by convention."""
    return node.meta.get(CUSTOM, {})


def get(node: fx.Node, key: str, default=None):
    return custom(node).get(key, default)


def update(node: fx.Node, **values) -> None:
    """Set keys of the node's lancet metadata (a new dict: graph copies may share the old one)."""
    node.meta[CUSTOM] = {**custom(node), **values}


def phase(node: fx.Node) -> str:
    """forward/backward as annotated while tracing; unannotated nodes count as backward."""
    return get(node, PHASE, BACKWARD)


def module(node: fx.Node) -> str:
    return get(node, MODULE, "")


def is_dispatch(node: fx.Node) -> bool:
    """Whether the node belongs to a MoE layer's dispatch stage (marked while tracing or by analysis)."""
    return get(node, MOE_STAGE) == DISPATCH


def part(node: fx.Node) -> int | None:
    return get(node, PART)


@contextlib.contextmanager
def dispatch_region() -> Iterator[None]:
    """Mark the ops traced inside as a MoE layer's dispatch stage (see the module docstring)."""
    with fx_traceback.annotate({MOE_STAGE: DISPATCH}):
        yield


@contextlib.contextmanager
def gate_region() -> Iterator[None]:
    """Mark the ops traced inside as a MoE layer's routing decision (informational)."""
    with fx_traceback.annotate({MOE_STAGE: GATE}):
        yield


@contextlib.contextmanager
def separate_region(label: str) -> Iterator[None]:
    """Mark the ops traced inside as one unit: the compiled executor never compiles them together with ops
    outside it (``lancet.graph.regions``), so a compiler cannot move work between units (e.g. keep every
    chunk of a chunked loss alive at once by fusing across chunks)."""
    with fx_traceback.annotate({UNIT: label}):
        yield


def unit(node: fx.Node) -> str | None:
    return get(node, UNIT)
