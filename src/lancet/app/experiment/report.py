"""``lancet experiment report``: markdown tables and charts of an experiment's output folder, from its JSON only.

Reads ``status.json``, the manifests, every ``lines/<id>/`` (line.json, bench.json, done.json) and
the comm curves the lines used. Writes ``report.md`` with: the runs (commit, GPUs, versions,
command line), step time per variant per regime for each comparison, one bench table per line
(the columns of docs/results.md), the comm curves, and the charts ``step_ms.png``,
``exposed_comm.png`` and ``predicted_vs_measured.png``. A line whose bench was cut off shows its
variants measured so far, marked partial.
"""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lancet.app.experiment.store import DONE, read_json
from lancet.measure import charts
from lancet.measure.report import bench_table, comm_table, markdown_table, regime_table


class ReportError(ValueError):
    """The folder holds no experiment results."""


@dataclass(slots=True)
class LineResult:
    number: int
    id: str
    line: dict
    regime: str
    state: str
    """done, or partial (a bench cut off after some variants)."""
    results: list[dict]
    manifest: str | None
    command: str
    comm: dict | None

    @property
    def group(self) -> str:
        """What the line compares across regimes: model, gate and the options other than the regime."""
        line = self.line
        options = [f"{k}={line[k]}" for k in ("dtype", "dispatch", "executor", "max_partitions", "memory_cap",
                                              "num_experts", "topk", "capacity_factor") if line.get(k) is not None]
        options += [k for k in ("no_dw", "no_partition", "profile_in_regime") if line.get(k)]
        world = f"{line['emulate'].split(':')[0]} emulated ranks" if line.get("emulate") else None
        return " ".join(filter(None, [line["model"], line.get("gate") or "default gate", world, *options]))


def write_report(source: Path, dest: Path | None = None, baseline: str = "captured", title: str | None = None) -> Path:
    """Render the report of ``source`` (a folder or its .tar.gz) into ``dest``; return report.md's path."""
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz")):
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(source, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
            name = source.name.split(".t")[0]
            return write_report(Path(tmp), dest or Path(f"{name}_report"), baseline, title=name)
    lines = load_lines(source)
    if not lines:
        raise ReportError(f"{source} holds no measured line (no lines/*/bench.json)")
    dest = dest or source / "report"
    dest.mkdir(parents=True, exist_ok=True)
    text = render(title or source.resolve().name, source, lines, dest, baseline)
    path = dest / "report.md"
    path.write_text(text)
    return path


def load_lines(source: Path) -> list[LineResult]:
    found = []
    for folder in sorted((source / "lines").glob("*/")):
        meta, bench = read_json(folder / "line.json"), read_json(folder / "bench.json")
        if meta is None or bench is None or not bench.get("results"):
            continue
        done = read_json(folder / DONE)
        comm_step = meta["steps"].get("profile-comm")
        comm = read_json(source / comm_step["folder"] / "comm.json") if comm_step else None
        found.append(LineResult(
            number=meta["line"]["number"], id=meta["line"]["id"], line=meta["line"], regime=meta["regime"],
            state="done" if done else "partial", results=bench["results"],
            manifest=(done or meta).get("manifest"), command=meta["steps"]["bench"]["command"],
            comm=comm["comm"] if comm else None,
        ))
    return sorted(found, key=lambda r: (r.number, r.id))


def render(title: str, source: Path, lines: list[LineResult], dest: Path, baseline: str) -> str:
    parts = [f"# Experiment results: {title}", _status(source), _runs(source, lines)]
    parts.append("## Step time per variant and regime\n\nstep ms (speed-up over eager in the same regime)")
    for group in dict.fromkeys(r.group for r in lines):
        cells = {(row["variant"], r.regime): row for r in lines if r.group == group for row in r.results}
        parts.append(f"### {group}\n\n{regime_table(cells)}")
    parts.append(_charts(lines, dest))
    parts.append("## Lines")
    for r in lines:
        mark = " (partial: the bench was cut off)" if r.state == "partial" else ""
        note = f"\n\n{r.line['note']}" if r.line.get("note") else ""
        parts.append(f"### line {r.number}: {r.id}{mark}\n\n{r.group}, regime {r.regime}; manifest "
                     f"`{r.manifest}`{note}\n\n`{r.command}`\n\n{bench_table(r.results, baseline)}")
    curves = {r.regime: r.comm for r in lines if r.comm is not None}
    if curves:
        parts.append(f"## Comm curves (`lancet profile-comm`)\n\n{comm_table(curves)}")
    return "\n\n".join(parts) + "\n"


def _status(source: Path) -> str:
    status = read_json(source / "status.json")
    if status is None:
        return "No status.json: the run that made this folder did not end normally."
    pending = [f"{line['number']} ({line['id']})" for line in status["lines"] if line["state"] != "done"]
    text = f"Latest run `{status['run_id']}`: {status['state']} ({status['message']})."
    return text + (f" Not done: lines {', '.join(pending)}." if pending else "")


def _runs(source: Path, lines: list[LineResult]) -> str:
    used = {r.manifest for r in lines}
    rows = []
    for path in sorted((source / "manifests").glob("*.json")):
        m = read_json(path)
        if m is None or f"manifests/{path.name}" not in used:
            continue
        plat, code = m["platform"], m["code"]
        gpus = f"{plat['gpu_count']} x {plat['gpus'][0]}" if plat["gpus"] else "none"
        commit = (code["commit"] or "?")[:10] + (" (dirty)" if code.get("dirty") else "")
        rows.append([f"`{m['run_id']}`", commit, f"`{code['source_sha256'][:10]}`", gpus,
                     f"{plat['torch']} / {plat['cuda'] or '-'} / {plat['nccl'] or '-'}", f"`{m['command']['line']}`"])
    head = ["run", "commit", "sources", "GPUs", "torch / CUDA / NCCL", "command"]
    return "## Runs\n\n" + markdown_table(head, rows)


def _charts(lines: list[LineResult], dest: Path) -> str:
    points = [_point(r, row) for r in lines for row in r.results]
    made = []
    if charts.bars_per_regime(points, "step_ms", "step ms", dest / "step_ms.png"):
        made.append("![step time per variant and regime](step_ms.png)")
    if charts.bars_per_regime(points, "exposed_comm_ms", "exposed comm ms", dest / "exposed_comm.png"):
        made.append("![exposed communication per variant and regime](exposed_comm.png)")
    if charts.predicted_vs_measured(points, dest / "predicted_vs_measured.png"):
        made.append("![predicted vs measured step time](predicted_vs_measured.png)")
    return "## Charts\n\n" + ("\n\n".join(made) if made else "(nothing to chart)")


def _point(r: LineResult, row: dict) -> charts.Point:
    trace, predicted = row.get("trace") or {}, row.get("predicted") or {}
    return charts.Point(group=r.group, regime=r.regime, variant=row["variant"], step_ms=row["step_ms"],
                        exposed_comm_ms=trace.get("exposed_comm_ms"), exposed_a2a_ms=trace.get("exposed_a2a_ms"),
                        predicted_ms=predicted.get("makespan_ms"))
