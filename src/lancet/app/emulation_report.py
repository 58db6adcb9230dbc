"""Reports on emulated benches: next to a measured run of the same configuration, and across regimes.

    lancet bench ... --emulate 4:ib100 --measured bench_4gpu_ib100.json   # emulated next to measured
    python -m lancet.app.emulation_report DIR_OR_BENCH_JSON...            # plan vs best tutel-dN, per bench

A measured bench is any ``lancet bench --json`` file of a real run (several GPUs); it must be of the
same model, gate, dtype and world size, and its network is named beside the regime (an
emulation priced by the ib100 curve compares with a run under ``--network ib100``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lancet.app.config import RunConfig
from lancet.app.experiment.steps import HF_PREFIX
from lancet.models import model_config


class MeasuredMismatch(ValueError):
    """A measured bench file is not of the emulated configuration."""


def _model_name(spec: dict) -> str:
    """The bench's model as the command line names it: ``hf:NAME`` for ``--hf-config NAME``."""
    if spec.get("hf_config"):
        return f"{HF_PREFIX}{spec['hf_config']}"
    return spec["model"] if ":" in spec["model"] else model_config(spec["model"]).name


def _configuration(run: dict) -> dict:
    spec = run["spec"]
    return {"model": _model_name(spec), "gate": spec["gate"], "topk": spec.get("topk"),
            "capacity_factor": spec.get("capacity_factor"), "num_experts": spec.get("num_experts"),
            "vocab_size": spec.get("vocab_size"), "dtype": run["dtype"]}


def load_measured(path: str, run: RunConfig) -> dict:
    """The bench document at ``path``; MeasuredMismatch when it is emulated or of another configuration."""
    with open(path) as f:
        document = json.load(f)
    emulation = run.emulation()
    if emulation is None:
        raise MeasuredMismatch("--measured compares an emulated bench (--emulate) with a measured one")
    if document.get("emulated") or document.get("run", {}).get("emulate"):
        raise MeasuredMismatch(f"{path} is itself an emulated bench")
    ours = _configuration(run.to_dict())
    theirs = _configuration(document["run"])
    differences = [f"{k}: measured {theirs[k]!r}, emulated {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
    if document.get("world_size") != emulation.world_size:
        differences.append(f"world size: measured {document.get('world_size')}, emulated {emulation.world_size}")
    if differences:
        raise MeasuredMismatch(f"{path} is a bench of another configuration:\n  " + "\n  ".join(differences))
    return document


def _trace(row: dict, key: str) -> float | None:
    return (row.get("trace") or {}).get(key)


def _cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)


def print_comparison(rows: list[dict], measured: dict, run: RunConfig, console: Console) -> None:
    """Per variant: step time and exposed all-to-all, emulated next to measured (variants both ran)."""
    by_variant = {r["variant"]: r for r in measured["results"]}
    network = measured["run"].get("network") or "native"
    title = f"emulated ({run.emulate}) vs measured ({measured['world_size']} GPUs, network {network})"
    table = Table(title=title)
    for column in ("variant", "step ms emulated", "step ms measured", "emulated / measured", "exposed a2a emulated",
                   "exposed a2a measured", "predicted ms"):
        table.add_column(column, justify="right")
    for row in rows:
        other = by_variant.get(row["variant"])
        if other is None:
            continue
        table.add_row(
            row["variant"], f"{row['step_ms']:.2f}", f"{other['step_ms']:.2f}", f"{row['step_ms'] / other['step_ms']:.3f}",
            _cell(_trace(row, "exposed_a2a_ms")), _cell(_trace(other, "exposed_a2a_ms")),
            _cell((row.get("predicted") or {}).get("makespan_ms")),
        )
    console.print(table)
    if measured.get("source"):
        console.print(f"measured: {measured['source']}")


# ---------------------------------------------------------------------------------------- summary of benches


def plan_vs_tutel(document: dict) -> dict | None:
    """For one bench document: the best tutel-dN, the plan's variants, and how they compare (None: no tutel row)."""
    rows = {r["variant"]: r for r in document["results"]}
    tutel = [r for name, r in rows.items() if name.startswith("tutel-d")]
    if not tutel or "lancet" not in rows:
        return None
    best = min(tutel, key=lambda r: r["step_ms"])
    lancet = rows["lancet"]
    predicted = (lancet.get("predicted") or {}).get("makespan_ms")
    emulated = document.get("emulated") or {}
    return {
        "model": _model_name(document["run"]["spec"]),
        "world_size": document["world_size"],
        "regime": emulated.get("regime") or document["run"].get("network") or "native",
        "emulated": bool(emulated),
        "captured_ms": rows.get("captured", {}).get("step_ms"),
        "best_tutel": best["variant"],
        "best_tutel_ms": best["step_ms"],
        "lancet_ms": lancet["step_ms"],
        "lancet_dw_ms": rows.get("lancet-dw", {}).get("step_ms"),
        "lancet_vs_best_tutel": best["step_ms"] / lancet["step_ms"],
        "lancet_predicted_ms": predicted,
        "lancet_exposed_a2a_ms": _trace(lancet, "exposed_a2a_ms"),
        "best_tutel_exposed_a2a_ms": _trace(best, "exposed_a2a_ms"),
    }


def summary_markdown(documents: list[dict]) -> str:
    head = ["model", "W", "regime", "captured ms", "best tutel-dN", "lancet ms", "lancet-dw ms", "best tutel / lancet",
            "exposed a2a lancet / best tutel", "lancet predicted ms (vs measured)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for document in documents:
        s = plan_vs_tutel(document)
        if s is None:
            continue
        regime = f"{s['regime']} (emulated)" if s["emulated"] else s["regime"]
        predicted = s["lancet_predicted_ms"]
        cells = [
            s["model"], str(s["world_size"]), regime, _cell(s["captured_ms"], "{:.1f}"),
            f"{s['best_tutel']} {s['best_tutel_ms']:.1f}", f"{s['lancet_ms']:.1f}", _cell(s["lancet_dw_ms"], "{:.1f}"),
            f"{s['lancet_vs_best_tutel']:.3f}",
            f"{_cell(s['lancet_exposed_a2a_ms'], '{:.1f}')} / {_cell(s['best_tutel_exposed_a2a_ms'], '{:.1f}')}",
            f"{predicted:.1f} ({predicted / s['lancet_ms'] - 1:+.1%})" if predicted else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wire_markdown(documents: list[dict]) -> str:
    """What ``lancet profile-comm --emulate`` measured of the stand-ins, beside what the regime measured of NCCL."""
    from lancet.runtime.regimes import SHIPPED_REGIMES, load_regime

    head = ["W", "network", "all-to-all 64 MiB ms", "curve says", "compute slowdown beside it", "regime measured",
            "issue ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for document in documents:
        identity, comm = document["identity"], document["comm"]
        name = identity["network"].removeprefix("emulated:")
        regime = load_regime(name) if name in SHIPPED_REGIMES else None
        measured = dict((x, y) for x, y in comm["curves"]["all_to_all"]).get(float(64 * 2**20))
        curve = None
        if regime is not None:
            from lancet.cost.wire import Wire

            world = identity["world_size"]
            curve = Wire(regime.comm, regime.measured_world, world).all_to_all_ms(64 * 2**20 * (world - 1) / world)
        cells = [str(identity["world_size"]), identity["network"], _cell(measured, "{:.3f}"), _cell(curve, "{:.3f}"),
                 f"{comm['contention']:.3f}", _cell(regime.comm.contention if regime else None, "{:.3f}"),
                 f"{comm['issue_ms']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _documents(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(bench documents, comm profiles) among the files given and the bench*.json / comm*.json under folders."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(sorted([*path.glob("**/bench*.json"), *path.glob("**/comm*.json")]) if path.is_dir() else [path])
    benches, comms = [], []
    for file in files:
        with open(file) as f:
            document = json.load(f)
        if "results" in document:
            benches.append(document)
        elif document.get("kind") == "comm":
            comms.append(document)
    return benches, comms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown tables of emulated runs: plan vs best tutel-dN per bench, "
                                                 "and the emulated wire per comm profile")
    parser.add_argument("paths", nargs="+", help="bench JSON and comm profile files, or folders searched for "
                                                 "bench*.json and comm*.json")
    args = parser.parse_args(argv)
    benches, comms = _documents(args.paths)
    if not benches and not comms:
        print("no bench JSON or comm profile found", file=sys.stderr)
        return 1
    if comms:
        print(wire_markdown(comms) + "\n")
    if benches:
        print(summary_markdown(benches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
