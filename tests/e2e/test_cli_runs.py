"""The commands end to end on CPU ranks (gloo): train learns the byte corpus; profile -> optimize -> bench."""

from __future__ import annotations

import json
import subprocess
import sys


def lancet(*args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lancet", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_train_loss_falls_on_the_byte_corpus(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lancet("train", "--model", "gpt2_moe_nl2_m64_nh4_sl32_b4", "--gate", "switch", "--steps", "20", "--nproc", "2",
           "--data", "stdlib", "--metrics-jsonl", str(metrics), cwd=tmp_path)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


MODEL = ["--model", "gpt2_moe_nl2_m32_nh2_sl8_b4", "--vocab-size", "256", "--nproc", "2"]


def test_profile_optimize_bench_pipeline(tmp_path):
    model = MODEL
    lancet("profile", *model, "--out", "profile.json", "--passes", "1", "--reps", "2", "--executor", "interpret",
           cwd=tmp_path)
    lancet("profile-comm", "--nproc", "2", "--out", "comm.json", "--max-bytes", "65536", "--reps", "2", cwd=tmp_path)
    optimized = lancet("optimize", "--profile", "profile.json", "--comm", "comm.json", "--out", "plan.json",
                       "--log-passes", cwd=tmp_path)
    assert "pass dw: " in optimized.stderr and "nodes" in optimized.stderr, optimized.stderr[-2000:]
    variants = ["eager", "captured", "lancet-dw", "lancet-part", "lancet", "tutel-d2"]
    lancet("bench", *model, "--variants", ",".join(variants), "--plan", "plan.json", "--steps", "2",
           "--warmup", "1", "--profile-steps", "1", "--rounds", "2", "--json", "bench.json", "--executor", "interpret",
           cwd=tmp_path)
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["variant"] for r in results] == variants
    assert [r["executor"] for r in results] == [None] + ["interpret"] * 5
    assert all(r["step_ms"] > 0 and r["trace"]["steps"] == 1 for r in results)
    assert all(len(r["round_ms"]) == 2 and min(r["round_ms"]) > 0 for r in results)
    assert all(r["predicted"]["makespan_ms"] > 0 for r in results[:5])
    profile = json.loads((tmp_path / "profile.json").read_text())["profile"]
    assert profile["executor"] is None and plan_options(tmp_path)["executor"] == "interpret"
    assert len(profile["ranks"]) == 2 and all(set(r["node_ms"]) == set(profile["nodes"]) for r in profile["ranks"])
    for name in profile["offrank_bytes"]:  # what the ranks send to each other is what they receive from each other
        sent, received = (sum(r["offrank_bytes"][name][i] for r in profile["ranks"]) for i in (0, 1))
        assert sent == received
    assert len(profile["offrank_bytes"]) == len([c for c in profile["collectives"].values() if c["kind"] == "all_to_all"])
    assert set(profile["comm_ms"]) == set(profile["collectives"]) and all(v > 0 for v in profile["comm_ms"].values())
    shared = json.loads((tmp_path / "comm.json").read_text())["comm"]["shared_directions"]
    assert shared is not None and 0.0 <= shared <= 1.0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["identity"]["gate"] == "switch_padded" and plan["drop_semantics"] == "micro-batch"
    assert profile["optimizer_ms"] > 0 and plan["predicted"]["after_ms"] == profile["optimizer_ms"]

    # The estimate of a partitioned step against its own measured profile; optimize refuses that profile.
    lancet("profile", *model, "--out", "profile_d2.json", "--passes", "1", "--reps", "2", "--tutel", "2",
           "--executor", "interpret", cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "lancet.app.estimate_check", "--profile", "profile.json", "--tutel-profile",
                    "profile_d2.json", "--comm", "comm.json", "--json", "check.json"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["parts"] == 2 and check["step_ms"]["estimate"] > 0 and check["step_ms"]["measured"] > 0
    assert check["phase_ms"]["measured"]["backward"] > 0
    refused = subprocess.run([sys.executable, "-m", "lancet", "optimize", "--profile", "profile_d2.json", "--comm",
                              "comm.json", "--out", "x.json"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode != 0 and "tutel-d2 step" in refused.stdout + refused.stderr


def plan_options(folder) -> dict:
    return json.loads((folder / "plan.json").read_text())["options"]


def test_compiled_executor_profile_optimize_bench_train(tmp_path):
    """Profile under the compiled executor (region timings price the plan), bench eager, torch.compile of the
    step and the captured step under each CPU executor side by side, train compiled.

    A one-layer model (Inductor compiles C++ on the CPU, slowly); the multi-rank executor tests compile the
    same model, so Inductor's on-disk cache serves most regions here.
    """
    model = ["--model", "gpt2_moe_nl1_m32_nh2_sl8_b4", "--vocab-size", "97", "--nproc", "2"]
    lancet("profile", *model, "--out", "profile.json", "--passes", "1", "--reps", "1", "--executor", "compiled",
           cwd=tmp_path)
    profile = json.loads((tmp_path / "profile.json").read_text())["profile"]
    executor = profile["executor"]
    assert executor["kind"] == "compiled" and executor["regions"] and executor["issue_ms"] > 0
    assert executor["compile"]["compiled_regions"] == len(executor["regions"])
    assert all(r["device_ms"] > 0 and r["eager_ms"] > 0 and set(r["nodes"]) <= set(profile["out_bytes"])
               for r in executor["regions"])
    lancet("profile-comm", "--nproc", "2", "--out", "comm.json", "--max-bytes", "4096", "--reps", "1", cwd=tmp_path)
    lancet("optimize", "--profile", "profile.json", "--comm", "comm.json", "--out", "plan.json", "--no-partition",
           cwd=tmp_path)
    assert plan_options(tmp_path)["executor"] == "compiled"

    variants = ["eager", "eager-compiled", "captured:interpret", "captured:compiled", "captured:compiled+inline"]
    run = lancet("bench", *model, "--variants", ",".join(variants), "--steps", "1", "--warmup", "2",
                 "--profile-steps", "1", "--json", "bench.json", cwd=tmp_path)
    results = {r["variant"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert list(results) == variants
    assert [r["executor"] for r in results.values()] == [None, "torch.compile", "interpret", "compiled", "compiled"]
    # the same graph, its collectives on the compute stream: its compiled regions are the other's
    inlined = results["captured:compiled+inline"]["compile"]
    assert inlined["inlined_collectives"] > 0 and results["captured:compiled"]["compile"]["inlined_collectives"] == 0
    assert inlined["shared"] == inlined["compiled_regions"]
    assert all(r["step_ms"] > 0 and r["host_issue_ms"] > 0 and r["trace"]["steps"] == 1 for r in results.values())
    compiled = results["captured:compiled"]["compile"]
    assert compiled["compiled_regions"] > 0 and compiled["seconds"] > 0
    assert results["captured:interpret"]["compile"]["compiled_regions"] == 0
    assert "compile captured:compiled:" in run.stdout

    metrics = tmp_path / "metrics.jsonl"
    train = lancet("train", *model, "--executor", "compiled", "--steps", "2", "--metrics-jsonl", str(metrics),
                   cwd=tmp_path)
    assert "executor: compiled" in train.stdout and len(metrics.read_text().splitlines()) == 2
