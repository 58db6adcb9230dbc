"""A fault injected on purpose, to check that a failure on one rank ends the whole job.

``LANCET_INJECT_FAULT=RANK:STEP`` makes rank RANK raise at the start of training step STEP.
"""

from __future__ import annotations

import os

INJECT_ENV = "LANCET_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """Raised where ``LANCET_INJECT_FAULT`` asks for it."""


def maybe_inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return
    fault_rank, fault_step = (int(v) for v in spec.split(":"))
    if (rank, step) == (fault_rank, fault_step):
        raise InjectedFault(f"fault injected on rank {rank} at step {step} ({INJECT_ENV}={spec})")
