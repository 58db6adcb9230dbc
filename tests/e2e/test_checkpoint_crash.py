"""A rank dying inside a checkpoint save leaves the previous checkpoint complete; resuming from it is bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _train(cwd, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "lancet", "train", "--model", "tiny", "--nproc", "2", "--steps", "6",
            "--checkpoint-dir", "ck", "--checkpoint-every", "2", "--metrics-jsonl", "m.jsonl", *extra]
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    crashed = _train(tmp_path, env={"LANCET_INJECT_FAULT": "0:4:save"})
    assert crashed.returncode == 1 and "rank 0 was killed by SIGKILL" in crashed.stderr, crashed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000002", "step_00000004.partial"]
    before = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    resumed = _train(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from ck/step_00000002 (step 2)" in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    after = records[len(before):]
    assert [r["step"] for r in before] == [0, 1, 2, 3] and [r["step"] for r in after] == [2, 3, 4, 5]
    assert [r["loss"] for r in after[:2]] == [r["loss"] for r in before[2:]]  # steps 2 and 3, twice: bitwise
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000004", "step_00000006"]
