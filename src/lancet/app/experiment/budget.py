"""The time budget of one driver run: when to stop, and how long a step may take.

A step is started only when its estimated duration fits in the time left. The estimate is the
longest earlier run of the same kind of step for the same model (a bench scaled by its number of
variants), from the done-markers in the output folder, so it learns across resumed runs; with no
such history, a per-kind default. A started step's timeout is the time left, less a reserve for
writing the status and the archive: a step cut off there is redone by the next run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

DEFAULT_ESTIMATE_S = {"profile": 60.0, "profile-comm": 45.0, "optimize": 20.0, "bench": 120.0}
RESERVE_S = 10.0


@dataclass(frozen=True, slots=True)
class Record:
    """How long a finished step took."""

    kind: str
    model: str
    seconds: float
    variants: int = 0


@dataclass(slots=True)
class Budget:
    """Deadline (None: unlimited), per-step timeout cap, and the history that estimates steps."""

    seconds: float | None = None
    step_timeout_s: float | None = None
    defaults: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ESTIMATE_S))
    history: list[Record] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)
    reserve_s: float = RESERVE_S

    def left(self) -> float | None:
        if self.seconds is None:
            return None
        return self.seconds - (time.monotonic() - self.start)

    def estimate(self, kind: str, model: str, variants: int = 0) -> tuple[float, str]:
        """Expected seconds of a step and where the figure comes from."""
        same = [r for r in self.history if r.kind == kind and r.model == model]
        if not same:
            return self.defaults[kind], "default"
        if kind == "bench" and variants:
            per_variant = max(r.seconds / max(r.variants, 1) for r in same)
            return per_variant * variants, f"{len(same)} earlier bench(es) of {model}, per variant"
        return max(r.seconds for r in same), f"{len(same)} earlier run(s)"

    def fits(self, estimate_s: float) -> bool:
        left = self.left()
        return left is None or left - self.reserve_s >= estimate_s

    def timeout(self) -> float | None:
        """Seconds the next step may run: the time left less the reserve, capped by the per-step timeout."""
        left = self.left()
        limits = [t for t in (None if left is None else left - self.reserve_s, self.step_timeout_s) if t is not None]
        return max(min(limits), 1.0) if limits else None

    def record(self, record: Record) -> None:
        self.history.append(record)
