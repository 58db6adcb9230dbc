"""A failure on one rank ends the whole job: within the bound, the original error printed once, no process left.

The bound (docs/design.md, "Failures"): under lancet's launcher the job ends within ``BOUND_S`` seconds of
the failure. The time is taken from the last step line rank 0 printed before the failure to the exit of
the launcher, so start-up (tens of seconds on two loaded cores) does not count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

BOUND_S = 15
"""Seconds from a rank's failure to the end of the job (measured 2.5-4 s on 2 CPU cores)."""
START_S = 240
"""Generous limit on start-up before the first step."""
TRAIN = [sys.executable, "-m", "lancet", "train", "--model", "tiny", "--steps", "100000", "--nproc", "2"]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(v) for v in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


class Job:
    """The train command in its own session; follows rank 0's step lines as they come."""

    def __init__(self, cwd, *extra: str, env: dict | None = None, close_stdout: bool = False) -> None:
        self.proc = subprocess.Popen([*TRAIN, *extra], cwd=cwd, env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.members: set[int] = set()
        if close_stdout:
            self.proc.stdout.close()

    def follow(self, until: str | None = None) -> float | None:
        """Read rank 0's lines (until one starts with ``until``); the time of the last step line."""
        last = None
        for line in self.proc.stdout:
            self.members.update(_descendants(self.proc.pid))
            if line.startswith("step"):
                last = time.monotonic()
            if until and line.startswith(until):
                break
        return last

    def finish(self) -> tuple[int, str]:
        try:
            err = self.proc.communicate(timeout=START_S)[1]
        finally:
            self.members.update(_descendants(self.proc.pid))
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        time.sleep(1)
        assert not [p for p in self.members if _alive(p)], "processes of the job outlived it"
        return self.proc.returncode, err


@pytest.mark.parametrize(
    "fault, env, extra, message",
    [
        ("exception on rank 1", {"LANCET_INJECT_FAULT": "1:3"}, [],
         "rank 1 failed: InjectedFault: fault injected on rank 1 at step 3"),
        ("rank 0 killed", {"LANCET_INJECT_FAULT": "0:3:kill"}, [], "rank 0 was killed by SIGKILL"),
        ("rank 0's metrics file fills the disk", {}, ["--metrics-jsonl", "/dev/full"],
         "rank 0 failed: OSError: [Errno 28] No space left on device"),
    ],
)
def test_a_failure_on_one_rank_ends_the_job(tmp_path, fault, env, extra, message):
    begin = time.monotonic()
    job = Job(tmp_path, *extra, env=env)
    last_step = job.follow()
    status, err = job.finish()
    end = time.monotonic()
    assert status == 1, err[-3000:]
    assert err.count(message) == 1, err[-3000:]
    assert "Traceback" not in err and err.count("lancet train: error:") == 1, err[-3000:]
    assert end - (last_step or begin) < (BOUND_S if last_step else START_S), f"{fault}: {end - (last_step or begin):.1f} s"


def test_closed_stdout_ends_the_job(tmp_path):
    job = Job(tmp_path, close_stdout=True)
    status, err = job.finish()
    assert status == 1
    assert err.count("rank 0 failed: BrokenPipeError") == 1 and "Traceback" not in err, err[-3000:]


def test_ctrl_c_stops_every_rank_after_saving(tmp_path):
    job = Job(tmp_path, "--checkpoint-dir", "ck", "--checkpoint-every", "1000")
    job.follow(until="step     2")
    signalled = time.monotonic()
    os.killpg(job.proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    rest = job.proc.stdout.read()
    status, err = job.finish()
    assert time.monotonic() - signalled < BOUND_S
    assert status == 130, err[-3000:]
    assert "interrupted: stopped on request after step" in err and "Traceback" not in err, err[-3000:]
    saved = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert len(saved) == 1 and saved[0] in rest and not saved[0].endswith(".partial")
