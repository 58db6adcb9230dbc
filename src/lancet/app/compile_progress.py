"""Progress of compiling a step program: a bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm

from lancet.runtime.compile import CompileEvent

PLAIN_LINES = 10
"""Away from a terminal, at most about this many lines per program (plus one per slow region)."""
SLOW_SECONDS = 30.0
"""A region that takes longer than this is always reported."""


def compile_progress(enabled: bool, label: str = "compile") -> Callable[[CompileEvent], None] | None:
    """A progress callback for ``RegionCompiler`` (None when not ``enabled``, e.g. on ranks other than 0)."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        return _Bar(label)
    return _Lines(label)


class _Bar:
    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: tqdm | None = None

    def __call__(self, event: CompileEvent) -> None:
        if self.bar is None:
            self.bar = tqdm(total=event.total, desc=f"{self.label}: regions", unit="region", leave=False)
        self.bar.set_postfix_str(f"{event.phase} region {event.region}{' (shared)' if event.shared else ''}")
        self.bar.update(1)
        if event.done >= event.total:
            self.bar.close()
            print(f"{self.label}: {event.summary}", file=sys.stderr, flush=True)


class _Lines:
    def __init__(self, label: str) -> None:
        self.label = label
        self.printed = 0

    def __call__(self, event: CompileEvent) -> None:
        tenth = event.done * PLAIN_LINES // max(event.total, 1)
        if tenth > self.printed or event.seconds > SLOW_SECONDS or event.done >= event.total:
            self.printed = tenth
            print(f"{self.label}: {event.done}/{event.total} regions ({event.phase} region {event.region}: "
                  f"{event.seconds:.1f} s{', shared' if event.shared else ''})", flush=True)
        if event.summary is not None:
            print(f"{self.label}: {event.summary}", flush=True)
