"""The output folder's state: which steps are done, written so that a cut-off never leaves a false "done".

Layout (all paths relative to the output folder, so it may move between runs):

    manifests/<run id>.json      one per driver run
    steps/<kind>/<slug>-<key>/   a shared step: its result JSON, log.txt, done.json
    lines/<id>/                  a line: line.json, bench.json, log.txt, traces/, done.json
    status.json                  how the latest run ended
    cutoffs.json                 steps cut off at a budget's end, and after how long

A step is done when its folder holds ``done.json`` with the step's key, its result file exists, and
the steps it read are still the runs it read (each done-marker carries a fresh completion id, and
a dependent records the ids of its inputs). ``done.json`` is written last, atomically, after the
result files were stamped with the manifest; a folder without it is cleared and its step redone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from lancet.app.experiment.budget import Record
from lancet.app.experiment.steps import OUTPUT_FLAGS, Step

DONE, FAILED, LOG, CUTOFFS = "done.json", "failed.json", "log.txt", "cutoffs.json"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    """The JSON at ``path``, or None when it is missing or unreadable (a write that never finished)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def done_marker(out: Path, step: Step) -> dict | None:
    """The step's done-marker when it is done for this very step and its inputs, else None."""
    marker = read_json(out / step.folder / DONE)
    if marker is None or marker.get("key") != step.key or not (out / step.output).exists():
        return None
    for dep in step.deps:
        dep_marker = read_json(out / dep.folder / DONE)
        if dep_marker is None or marker.get("inputs", {}).get(dep.folder) != dep_marker.get("completion"):
            return None
    return marker


def clear(out: Path, step: Step) -> Path:
    """Empty the step's folder (what a cut-off or stale run left) and return it."""
    folder = out / step.folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def stamp_outputs(out: Path, step: Step, manifest: str) -> None:
    """Name the run's manifest in every JSON file the step wrote (its result and those beside it)."""
    for name in OUTPUT_FLAGS[step.kind].values():
        path = out / step.folder / name
        if path.suffix == ".json" and path.is_file():
            data = read_json(path)
            # lancet artifacts are checksummed: their writer names the manifest (LANCET_MANIFEST), never an edit
            if isinstance(data, dict) and "checksum" not in data:
                data["manifest"] = manifest
                write_json(path, data)


def mark_done(out: Path, step: Step, *, argv: list[str], seconds: float, manifest: str) -> dict:
    """Write the step's done-marker (last, atomically) with a fresh completion id and the ids of its inputs."""
    inputs = {dep.folder: read_json(out / dep.folder / DONE)["completion"] for dep in step.deps}
    marker = {
        "kind": step.kind, "key": step.key, "completion": uuid.uuid4().hex, "manifest": manifest,
        "command": step.display(), "argv": argv, "env": step.env, "inputs": inputs, "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": step.model, "variants": step.variants,
        "lines": step.lines,
    }
    write_json(out / step.folder / DONE, marker)
    return marker


def mark_failed(out: Path, step: Step, *, returncode: int | None, error: str, manifest: str) -> None:
    """Record why the step failed, for the report; a failed step is never done and runs again next time."""
    write_json(out / step.folder / FAILED, {"kind": step.kind, "key": step.key, "returncode": returncode,
                                            "error": error, "manifest": manifest, "command": step.display()})


def record_cutoff(out: Path, step: Step, *, seconds: float, manifest: str) -> list[float]:
    """Note that ``step`` was cut off at a budget's end after ``seconds``; return all its cut-offs so far."""
    path = out / CUTOFFS
    cutoffs = read_json(path) or {}
    mine = [c for c in cutoffs.get(step.folder, []) if c["key"] == step.key]
    mine.append({"key": step.key, "seconds": round(seconds, 3), "manifest": manifest, "kind": step.kind,
                 "model": step.model, "variants": step.variants})
    cutoffs[step.folder] = mine
    write_json(path, cutoffs)
    return [c["seconds"] for c in mine]


def history(out: Path) -> list[Record]:
    """Durations of every finished step in the folder, and the time cut-off steps ran before they were
    stopped (a lower bound of what they need), for the budget's estimates."""
    records = [Record(c["kind"], c["model"], c["seconds"], c["variants"])
               for entries in (read_json(out / CUTOFFS) or {}).values() for c in entries]
    for path in [*out.glob(f"steps/*/*/{DONE}"), *out.glob(f"lines/*/{DONE}")]:
        marker = read_json(path)
        if marker and "seconds" in marker:
            records.append(Record(marker["kind"], marker.get("model", ""), marker["seconds"], marker.get("variants", 0)))
    return records
