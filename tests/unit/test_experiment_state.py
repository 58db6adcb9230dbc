"""Done-markers, the time budget, and the report rendered from hand-written JSON."""

from __future__ import annotations

import json
from pathlib import Path

from lancet.app.experiment import store
from lancet.app.experiment.budget import Budget, Record
from lancet.app.experiment.report import write_report
from lancet.app.experiment.spec import parse_experiments
from lancet.app.experiment.steps import build_steps
from lancet.measure.report import bench_table, comm_table

LINES = ('{"model": "tiny", "id": "a", "variants": ["eager", "lancet"], "network": "ib100"}\n'
         '{"model": "tiny", "id": "b", "variants": ["eager", "lancet"], "network": "nvlink"}')


def finish(out: Path, step, seconds: float = 1.0) -> dict:
    folder = store.clear(out, step)
    (folder / Path(step.output).name).write_text("{}")
    store.stamp_outputs(out, step, "manifests/r.json")
    return store.mark_done(out, step, argv=[], seconds=seconds, manifest="manifests/r.json")


def test_done_only_with_marker_output_and_unchanged_inputs(tmp_path):
    (a, _) = build_steps(parse_experiments(LINES))
    profile, comm = a.plan.deps
    for step in (profile, comm, a.plan):
        assert store.done_marker(tmp_path, step) is None
        finish(tmp_path, step)
    assert store.done_marker(tmp_path, a.plan)["kind"] == "optimize"
    assert json.loads((tmp_path / a.plan.output).read_text())["manifest"] == "manifests/r.json"
    finish(tmp_path, profile)  # the profile was redone: the plan made from the old one is stale
    assert store.done_marker(tmp_path, a.plan) is None
    finish(tmp_path, a.plan)
    (tmp_path / a.plan.output).unlink()  # a result that went missing
    assert store.done_marker(tmp_path, a.plan) is None
    folder = store.clear(tmp_path, comm)  # a cut-off leaves a folder without marker
    (folder / "comm.json").write_text("{}")
    assert store.done_marker(tmp_path, comm) is None
    assert sorted(r.kind for r in store.history(tmp_path)) == ["optimize", "profile"]


def test_budget_estimates_from_history_and_stops():
    budget = Budget(seconds=100.0, defaults={"profile": 30.0, "profile-comm": 5.0, "optimize": 5.0, "bench": 50.0})
    assert budget.estimate("bench", "m", 4) == (50.0, "default")
    budget.record(Record("bench", "m", 40.0, variants=2))
    budget.record(Record("bench", "other", 400.0, variants=1))
    assert budget.estimate("bench", "m", 4)[0] == 80.0
    assert budget.fits(80.0) and not budget.fits(95.0)  # 10 s stay in reserve
    assert 85.0 < budget.timeout() <= 90.0
    assert Budget().fits(1e9) and Budget().timeout() is None
    assert Budget(step_timeout_s=7.0).timeout() == 7.0


def _bench_row(variant: str, step_ms: float, predicted: float | None = None) -> dict:
    trace = {"step_ms": step_ms, "compute_ms": step_ms * 0.6, "comm_ms": step_ms * 0.3, "a2a_ms": step_ms * 0.2,
             "exposed_comm_ms": step_ms * 0.2, "exposed_a2a_ms": step_ms * 0.1, "exposed_backward_a2a_ms": 1.0}
    return {"variant": variant, "step_ms": step_ms, "tokens_per_s": 1e6 / step_ms, "peak_mem_gib": None,
            "trace": trace, "round_ms": [step_ms], "predicted": {"makespan_ms": predicted} if predicted else None}


def _write_line(out: Path, number: int, regime: str, rows: list[dict], done: bool = True) -> None:
    folder = out / "lines" / f"l{number}"
    line = {"number": number, "id": f"l{number}", "model": "tiny", "gate": "switch", "network": regime}
    store.write_json(folder / "line.json", {"line": line, "regime": regime, "manifest": "manifests/r.json", "steps": {
        "bench": {"folder": f"lines/l{number}", "command": "lancet bench ..."},
        "profile-comm": {"folder": f"steps/profile-comm/{regime}"}}})
    store.write_json(folder / "bench.json", {"results": rows, "manifest": "manifests/r.json"})
    store.write_json(out / f"steps/profile-comm/{regime}/comm.json", {"comm": {
        "curves": {"all_to_all": [[4096.0, 0.1], [2.0**30, 60.0]]}, "contention": 1.2, "issue_ms": 0.03}})
    if done:
        store.write_json(folder / "done.json", {"manifest": "manifests/r.json"})


def test_report_from_json(tmp_path):
    _write_line(tmp_path, 1, "ib100", [_bench_row("eager", 150.0, 170.0), _bench_row("lancet", 130.0, 145.0)])
    _write_line(tmp_path, 2, "nvlink", [_bench_row("eager", 100.0)], done=False)
    store.write_json(tmp_path / "manifests/r.json", {
        "run_id": "r", "command": {"line": "lancet experiment run x.jsonl"},
        "code": {"commit": "abc123", "dirty": False, "source_sha256": "f" * 64},
        "platform": {"gpu_count": 2, "gpus": ["NVIDIA H200"] * 2, "torch": "2.11.0", "cuda": "13.0", "nccl": "2.27.5"}})
    report = write_report(tmp_path).read_text()
    assert "| lancet | 130.0 (1.15x) |  |" in report  # variants by regimes
    assert "2 x NVIDIA H200" in report and "### line 2: l2 (partial: the bench was cut off)" in report
    assert "| lancet |  | 130.0 |  | 1.154 |" in report and "+11.5%" in report
    assert "No status.json" in report
    for chart in ("step_ms.png", "exposed_comm.png", "predicted_vs_measured.png"):
        assert (tmp_path / "report" / chart).stat().st_size > 1000


def test_tables():
    table = bench_table([_bench_row("eager", 100.0), _bench_row("captured", 90.0, 99.0)], baseline="captured")
    assert table.splitlines()[0].startswith(
        "| variant | executor | step ms | q1-q3 ms | x eager | tokens/s | a2a ms | exposed a2a | vs captured")
    assert "| captured |  | 90.0 |  | 1.111 | 11,111 | 18.0 | 9.0 | +0.0 | 1.0 | 18.0 | 54.0 | 99.0 | +10.0% |" in table
    comm = comm_table({"ib100": {"curves": {"all_to_all": [[2.0**20, 1.0], [2.0**26, 4.0]]}, "contention": 1.25,
                                 "issue_ms": 0.032}})
    assert "| ib100 | 1.333 ms | 4.000 ms |  | 1.250 | 0.032 |" in comm


def test_cutoffs_count_per_step_and_feed_the_estimates(tmp_path):
    (a, b) = build_steps(parse_experiments(LINES))
    assert store.record_cutoff(tmp_path, a.bench, seconds=100.0, manifest="m1") == [100.0]
    assert store.record_cutoff(tmp_path, b.bench, seconds=50.0, manifest="m1") == [50.0]
    assert store.record_cutoff(tmp_path, a.bench, seconds=300.0, manifest="m2") == [100.0, 300.0]
    budget = Budget(seconds=1000.0, history=store.history(tmp_path))
    assert budget.estimate("bench", "tiny", 2)[0] == 300.0  # at least what the longest cut-off run had


def test_archive_round_trip(tmp_path):
    from rich.console import Console

    from lancet.app.experiment.outputs import pack, restore

    (a, _) = build_steps(parse_experiments(LINES))
    profile = a.plan.deps[0]
    marker = finish(tmp_path / "out", profile)
    pack(tmp_path / "out", tmp_path / "out.tar.gz", Console(quiet=True))
    restore(tmp_path / "out.tar.gz", tmp_path / "again")
    assert store.done_marker(tmp_path / "again", profile)["completion"] == marker["completion"]
