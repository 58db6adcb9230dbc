"""Ctrl-C as a request: finish the step, agree with the other ranks, save if checkpointing, then stop.

A terminal's Ctrl-C sends SIGINT to every process of the job (the launcher
passes it on as well), usually while ranks are inside a step. Stopping there
would leave the others waiting in a collective, so SIGINT only sets a flag that
``StepGuard`` shares with every rank at the end of the step; all ranks then stop
after the same step. If the ranks do not stop within the launcher's grace period
(30 s), the launcher kills them. SIGTERM keeps its default meaning (stop now): it
is what the launcher sends when another rank has failed.
"""

from __future__ import annotations

import signal
import threading


class StoppedOnRequest(KeyboardInterrupt):
    """Raised by every rank after it stopped on request (and saved): the rank then leaves at once.

    (A rank that returned normally would wait for a launcher that is shutting down to collect its result.)
    """


class StopRequest:
    """Context manager: while active, SIGINT sets ``requested`` instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
