"""A failure on one rank ends the whole job: bounded time, the error reported, no process left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

BOUND_S = 90


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


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_exception_on_one_rank_ends_the_job(tmp_path, failing_rank):
    env = {**os.environ, "LANCET_INJECT_FAULT": f"{failing_rank}:1"}
    begin = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lancet", "train", "--model", "tiny", "--steps", "50", "--nproc", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=BOUND_S)
    finally:
        leftover = _descendants(proc.pid)
        proc.kill()
    assert time.monotonic() - begin < BOUND_S
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert f"lancet train: error: rank {failing_rank} failed" in err
    assert err.count(f"fault injected on rank {failing_rank} at step 1") >= 1
    time.sleep(1)
    assert not [p for p in leftover if _alive(p)], "processes of the job outlived it"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")
