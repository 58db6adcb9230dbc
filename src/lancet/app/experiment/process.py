"""One lancet command as a child process: output to a log file, a timeout, and no process left behind.

The child stays in the driver's process group, so a signal sent to the whole group (a terminal's
Ctrl-C, ``timeout``'s kill of a command) reaches every rank too. When the driver ends a child
itself (timeout, interrupt), it sends SIGTERM to the child and all its descendants, and SIGKILL to
those still alive after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class Finished:
    returncode: int | None
    """None when the driver ended the command (timeout)."""
    seconds: float
    timed_out: bool


def run_lancet(argv: list[str], *, log: Path, env: dict[str, str], timeout_s: float | None) -> Finished:
    """Run ``python -m lancet ARGV`` with stdout and stderr appended to ``log``."""
    begin = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"$ lancet {' '.join(argv)}\n")
        sink.flush()
        child = subprocess.Popen([sys.executable, "-m", "lancet", *argv], stdout=sink, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            end_tree(child)
            return Finished(None, time.monotonic() - begin, True)
        except BaseException:  # interrupted: take the command down with the driver
            end_tree(child)
            raise
    return Finished(returncode, time.monotonic() - begin, False)


def end_tree(child: subprocess.Popen) -> None:
    """SIGTERM to ``child`` and its descendants, then SIGKILL to any still alive after the grace period."""
    pids = [*descendants(child.pid), child.pid]
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        child.poll()  # reaps the direct child once it exits
        if not any(_alive(p) for p in pids):
            break
        time.sleep(0.1)
    _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    child.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from ``ps``."""
    listing = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for row in listing.splitlines():
        child, parent = (int(v) for v in row.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state != "Z"
