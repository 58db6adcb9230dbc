"""Python garbage collection on a schedule instead of at random points of a step.

Automatic collection pauses a rank at a moment decided by its own allocation
count; in a multi-rank step the other ranks then wait for it inside the next
collective. Captured graphs hold many long-lived objects, which makes such a
pause longer. ``ScheduledCollection`` turns automatic collection off and
collects the young generations every ``every`` steps, at the same step on every
rank, outside the timed region.
"""

from __future__ import annotations

import gc
from types import TracebackType


class ScheduledCollection:
    """Context manager: no automatic collection inside; ``after_step`` collects every ``every`` steps."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"collect every N >= 1 steps, got {every}")
        self.every = every
        self._was_enabled = False

    def __enter__(self) -> ScheduledCollection:
        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def after_step(self, step: int) -> None:
        """Collect generations 0 and 1 after every ``every``-th step (``step`` counts from 0)."""
        if (step + 1) % self.every == 0:
            gc.collect(1)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._was_enabled:
            gc.enable()
        gc.collect()
