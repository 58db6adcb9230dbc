"""Which pass pipelines the planner tries: a table, not code.

``ORDER_PIPELINES`` lists the order-only pipelines ``choose_order`` simulates on
a step graph (the fastest wins; ties go to the shorter pipeline, listed first).
``PARTITIONED_STEP`` is applied to every step captured from a partitioned
forward; the forward itself is partitioned by
``lancet.passes.partition.rewrite.partition_passes`` (rewrite, pipeline order,
count merge). Pass settings (a memory cap) are bound by ``order_passes``.
"""

from __future__ import annotations

import functools

from lancet.passes.allreduce_gaps import allreduce_gaps_pass
from lancet.passes.dw import dw_pass
from lancet.passes.early_collectives import early_collectives_pass
from lancet.passes.protocol import Pass

DW, ALLREDUCE_GAPS, EARLY_COLLECTIVES = "dw", "allreduce-gaps", "early-collectives"

ORDER_PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "allreduce": (ALLREDUCE_GAPS,),
    "dw": (DW,),
    "dw+allreduce": (DW, ALLREDUCE_GAPS),
}
"""Name (as recorded in a plan's ``chosen``) -> the passes, in order."""

PARTITIONED_STEP: tuple[str, ...] = (EARLY_COLLECTIVES,)


def order_passes(*, memory_cap_bytes: int | None = None) -> dict[str, Pass]:
    """The listed step-graph passes by name, with their settings bound."""
    return {
        DW: Pass(DW, functools.partial(dw_pass, memory_cap_bytes=memory_cap_bytes), in_place=True, order_only=True),
        ALLREDUCE_GAPS: Pass(ALLREDUCE_GAPS, allreduce_gaps_pass, in_place=True, order_only=True),
        EARLY_COLLECTIVES: Pass(EARLY_COLLECTIVES, early_collectives_pass, in_place=True, order_only=True),
    }


def order_pipelines(*, schedule_dw: bool = True) -> dict[str, tuple[str, ...]]:
    """``ORDER_PIPELINES``, without those holding the dW pass when it is turned off."""
    return {name: passes for name, passes in ORDER_PIPELINES.items() if schedule_dw or DW not in passes}
