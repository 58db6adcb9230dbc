"""Reports on emulated benches: next to a measured run, and plan vs best tutel-dN."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lancet.app.config import ModelSpec, RunConfig
from lancet.app.emulation_report import load_measured, plan_vs_tutel, print_comparison, summary_markdown

RUN3_IB100 = Path(__file__).parents[2] / "docs/data/measured_gpt2_moe_nl12_m768_nh16_sl512_b48_w4_ib100.json"


def _row(variant: str, step_ms: float, exposed: float, predicted: float | None = None) -> dict:
    return {"variant": variant, "step_ms": step_ms, "trace": {"exposed_a2a_ms": exposed},
            "predicted": {"makespan_ms": predicted} if predicted else None}


def _document() -> dict:
    return {"run": {"spec": {"model": "gpt2_moe_nl12_m768_nh16_sl512_b48"}, "network": None, "emulate": "8:ib100"},
            "world_size": 8, "emulated": {"regime": "ib100"},
            "results": [_row("captured", 150.0, 40.0, 160.0), _row("tutel-d2", 140.0, 30.0), _row("tutel-d4", 170.0, 60.0),
                        _row("lancet-dw", 125.0, 20.0, 130.0), _row("lancet", 120.0, 15.0, 132.0)]}


def test_plan_against_the_best_tutel_degree():
    summary = plan_vs_tutel(_document())
    assert summary["best_tutel"] == "tutel-d2" and summary["lancet_vs_best_tutel"] == 140.0 / 120.0
    line = summary_markdown([_document()]).splitlines()[-1]
    assert "| ib100 (emulated) |" in line and "| 1.167 |" in line and "132.0 (+10.0%)" in line
    assert line.startswith("| gpt2_moe_nl12_m768_nh16_sl512_b48 | 8 |")


def test_a_huggingface_bench_is_named_by_its_config():
    document = _document()
    document["run"]["spec"] = {"model": "cpu_small", "hf_config": "qwen3-moe-h200"}  # the spec's default model name
    assert plan_vs_tutel(document)["model"] == "hf:qwen3-moe-h200"


def test_run_3_is_printed_beside_an_emulated_bench():
    run = RunConfig(spec=ModelSpec(model="paper_small_p4de"), dtype="bf16", emulate="4:ib100")
    measured = load_measured(str(RUN3_IB100), run)
    console = Console(record=True, width=200)
    print_comparison([_row("lancet", 120.6, 30.0, 140.0), _row("tutel-d16", 300.0, 1.0)], measured, run, console)
    text = console.export_text()
    assert "134.00" in text and "0.900" in text  # run 3's lancet row, and 120.6 / 134.0
    assert "tutel-d16" not in text  # only variants both runs have
    assert "transcribed from docs/results.md, run 3" in text


def test_the_emulated_wire_beside_the_regimes_measurement():
    from lancet.app.emulation_report import wire_markdown

    document = {"identity": {"world_size": 4, "network": "emulated:ib100"},
                "comm": {"curves": {"all_to_all": [[float(64 * 2**20), 4.2]]}, "contention": 1.3, "issue_ms": 0.05}}
    line = wire_markdown([document]).splitlines()[-1]
    assert line == "| 4 | emulated:ib100 | 4.200 | 4.070 | 1.300 | 1.240 | 0.050 |"
