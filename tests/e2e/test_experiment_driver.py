"""``lancet experiment run`` end to end on 2 gloo ranks: cut off after its first line, resumed, reported.

The two lines share the profile and the comm curves; the second has a plan of its own (no dW).
The first run is stopped by SIGTERM once the first line is done (as a command limit would stop
it); the second run must do only the second line's steps. A failing step and a spent budget
stop a run before any rank starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lancet.app.experiment.process import descendants

TINY = {"model": "gpt2_moe_nl2_m32_nh2_sl8_b4", "vocab_size": 256, "nproc": 2}
DEFAULTS = {**TINY, "passes": 1, "reps": 2, "comm_args": {"max-bytes": 65536}, "steps": 1, "warmup": 1,
            "profile_steps": 1, "executor": "interpret"}  # interpreted: no Inductor compile of CPU kernels


def write_lines(path: Path, *lines: dict) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def driver(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lancet", "experiment", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def done(out: Path, folder: str) -> dict:
    return json.loads((out / folder / "done.json").read_text())


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Run 1 cut off after line 1; run 2 resumes. Returns (folder, run 1's markers, run 2's status)."""
    tmp = tmp_path_factory.mktemp("experiment")
    write_lines(tmp / "two.jsonl", {"defaults": DEFAULTS}, {"id": "first", "variants": ["captured", "lancet"]},
                {"id": "second", "variants": ["lancet"], "no_dw": True})
    out = tmp / "out"
    first = driver("run", "two.jsonl", "--out", "out", cwd=tmp)
    while first.poll() is None and not (out / "lines/first/done.json").exists():
        time.sleep(0.5)
    children = descendants(first.pid)
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stdout[-3000:] + stderr[-3000:]
    time.sleep(1)
    assert not [p for p in children if _alive(p)], "processes of the cut-off step outlived the driver"
    markers = {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("done.json")}
    second = driver("run", "two.jsonl", "--out", "out", cwd=tmp)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return out, markers, json.loads((out / "status.json").read_text())


def test_cut_off_run_resumes_with_the_second_line_only(resumed_run):
    out, markers, status = resumed_run
    assert "lines/first" in markers and "lines/second" not in markers
    for folder, marker in markers.items():  # nothing finished before the cut-off ran again
        assert done(out, folder)["completion"] == marker["completion"]
    run_two = status["manifest"]
    redone = sorted(f for f in status["steps_run"])
    assert redone == sorted(["lines/second", next(f for f in redone if f.startswith("steps/optimize/"))])
    assert done(out, "lines/second")["manifest"] == run_two
    assert [line["state"] for line in status["lines"]] == ["done", "done"] and status["state"] == "complete"
    profiles = list(out.glob("steps/profile/*/done.json"))
    assert len(profiles) == 1 and len(list(out.glob("steps/optimize/*/done.json"))) == 2
    bench = json.loads((out / "lines/second/bench.json").read_text())
    assert [r["variant"] for r in bench["results"]] == ["lancet"] and bench["manifest"] == run_two
    results = [p for p in out.glob("steps/*/*/*.json") if p.name != "done.json"]
    assert sorted(p.name for p in results) == ["comm.json", "plan.json", "plan.json", "profile.json"]
    assert all(json.loads(p.read_text())["manifest"].startswith("manifests/") for p in results)
    manifest = json.loads((out / run_two).read_text())
    assert manifest["command"]["argv"][:3] == ["lancet", "experiment", "run"] and manifest["platform"]["torch"]
    assert list((out / "lines/first/traces/captured").glob("rank*.json.gz"))


def test_report_renders_from_the_json(resumed_run, tmp_path):
    out, _, _ = resumed_run
    result = subprocess.run([sys.executable, "-m", "lancet", "experiment", "report", str(out), "--to", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "### line 2: first" in report and "### line 3: second" in report
    assert "| variant | executor | step ms | q1-q3 ms | x eager |" in report and "## Comm curves" in report
    assert "| captured |" in report and "| lancet |" in report
    assert (tmp_path / "step_ms.png").stat().st_size > 0 and (tmp_path / "predicted_vs_measured.png").exists()


def test_failing_step_stops_the_run_naming_the_line(tmp_path):
    write_lines(tmp_path / "x.jsonl", {**TINY, "id": "broken", "variants": ["lancet"], "passes": 0},
                {**TINY, "id": "never", "variants": ["eager"]})
    run = driver("run", "x.jsonl", "--out", "out", cwd=tmp_path)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert "line 1 (broken)" in stdout and "`lancet profile` failed" in stdout
    assert "--passes and --reps must be >= 1" in stdout
    assert not (tmp_path / "out/lines/never").exists()
    status = json.loads((tmp_path / "out/status.json").read_text())
    assert status["state"] == "failed" and "broken" in status["message"]
    (failed,) = (tmp_path / "out").glob("steps/profile/*/failed.json")
    assert "--passes" in json.loads(failed.read_text())["error"]


def test_spent_budget_stops_before_a_step_that_cannot_finish(tmp_path):
    write_lines(tmp_path / "x.jsonl", {**TINY, "variants": ["eager"]})
    run = driver("run", "x.jsonl", "--out", "out", "--budget-s", "60", "--estimate", "bench=600", "--archive",
                 "out.tar.gz", cwd=tmp_path)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 75, stdout[-3000:] + stderr[-3000:]
    assert "needs about 600 s (default)" in stdout and "Run the same command again" in stdout
    assert json.loads((tmp_path / "out/status.json").read_text())["state"] == "budget"
    assert not (tmp_path / "out/lines").exists() and (tmp_path / "out.tar.gz").stat().st_size > 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")
