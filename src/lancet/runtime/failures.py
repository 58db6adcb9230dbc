"""How a launched job tells which rank failed first, and why, in one line.

When one rank fails, the others fail after it: a collective with a peer that
left raises on every survivor ("connection closed by peer"), and the launcher
stops the rest with SIGTERM. Only the first, original error is worth showing.
Every rank therefore writes a small record of its failure (time, rank, one
line, the traceback, and whether it is a consequence of a peer's failure) into
a folder the launcher names in ``LANCET_FAILURE_DIR``, *before* it tears its
process group down, so the original error is always the earliest primary
record. A rank killed by a signal (SIGKILL, the out-of-memory killer) writes
nothing; the launcher learns of it from the exit status.

Contract of ``describe_failure``: a primary record wins (earliest first); else a
rank that died without a record, by a signal the launcher did not send; else the
earliest secondary record; else the exit status of the lowest failed rank.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

FAILURE_DIR_ENV = "LANCET_FAILURE_DIR"

PRIMARY, SECONDARY, INTERRUPTED = "primary", "secondary", "interrupted"

_PEER_MESSAGES = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "socket timeout",
    "timed out",
    "ncclremoteerror",
    "process group was aborted",
    "nccl communicator was aborted",
)


@dataclass(slots=True)
class FailureRecord:
    rank: int
    time: float
    kind: str
    """primary (this rank's own error), secondary (a consequence of a peer's) or interrupted (Ctrl-C)."""
    line: str
    """``ExceptionType: message``, one line."""
    traceback: str


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``; for an exit caused by another error (rich exits on a closed stdout),
    that error's."""
    if isinstance(err, SystemExit) and err.__context__ is not None:
        err = err.__context__
    if isinstance(err, KeyboardInterrupt):
        return str(err).strip() or "interrupted"
    if isinstance(err, BrokenPipeError):
        return f"BrokenPipeError: {err} (its output was closed)"
    message = str(err).strip()
    first = message.splitlines()[0] if message else ""
    name = type(err).__name__
    return f"{name}: {first}" if first else name


def classify(err: BaseException) -> str:
    """Whether ``err`` is this rank's own failure or the echo of another rank's."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    import torch.distributed as dist

    text = str(err).lower()
    peer_types = tuple(t for t in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistBackendError", None)) if t)
    if (peer_types and isinstance(err, peer_types)) or any(m in text for m in _PEER_MESSAGES):
        if not isinstance(err, BrokenPipeError):  # a closed stdout is this rank's own problem
            return SECONDARY
    return PRIMARY


def record_failure(err: BaseException, rank: int) -> None:
    """Write this rank's failure record, once (the first call wins); no-op outside a lancet launch."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank{rank}.json"
    if path.exists():
        return
    cause = err.__context__ if isinstance(err, SystemExit) and err.__context__ is not None else err
    record = FailureRecord(rank, time.time(), classify(cause), error_line(err),
                           "".join(traceback.format_exception(err)))
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(path)
    except OSError:  # the record is a courtesy; the exit status still tells the launcher
        pass


def read_failures(folder: str | Path) -> list[FailureRecord]:
    records = []
    for path in sorted(Path(folder).glob("rank*.json")):
        try:
            records.append(FailureRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return records


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def describe_failure(records: list[FailureRecord], exitcodes: dict[int, int]) -> str:
    """One line naming the first failed rank and its error (see the module contract)."""
    recorded = {r.rank for r in records}
    primary = sorted((r for r in records if r.kind == PRIMARY), key=lambda r: (r.time, r.rank))
    if primary:
        return f"rank {primary[0].rank} failed: {primary[0].line}"
    launcher_signals = (-signal.SIGTERM, -signal.SIGINT)
    killed = sorted(rank for rank, code in exitcodes.items()
                    if rank not in recorded and code < 0 and code not in launcher_signals)
    if killed:
        rank = killed[0]
        hint = " (out of memory?)" if exitcodes[rank] == -signal.SIGKILL else ""
        return f"rank {rank} was killed by {_signal_name(exitcodes[rank])}{hint}"
    others = sorted(records, key=lambda r: (r.time, r.rank))
    if others:
        return f"rank {others[0].rank} failed: {others[0].line}"
    if exitcodes:
        rank = min(exitcodes)
        code = exitcodes[rank]
        status = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with status {code}"
        return f"rank {rank} {status}"
    return "a rank failed"
