"""Emulated runs through the command line: profile-comm follows the regime, train reports rank 0's loss, bench labels rows."""

from __future__ import annotations

import json

import pytest

from lancet.app.data import make_batch_source
from lancet.models import model_config
from lancet.cost.comm import CommProfile, PiecewiseLinear
from lancet.plan.artifact import RunIdentity, write_artifact
from tests.e2e.test_cli_runs import lancet
from tests.emulation import MiB, tied_reference

MODEL = ["--model", "gpt2_moe_nl3_m32_nh2_sl8_b3", "--vocab-size", "97"]


def _toy_regime_file(path) -> str:
    """A user's own comm profile: 20 ms + 20 ms per MiB per rank, measured on 2 ranks."""
    curve = PiecewiseLinear([(0.0, 20.0), (MiB, 40.0)])
    identity = RunIdentity(model="", gate="", world_size=2, dtype="", device="cuda:X", network="ib100",
                           torch_version="2.11.0")
    write_artifact(path, "comm", identity, {"comm": CommProfile(curves={"all_to_all": curve, "all_reduce": curve}).to_json()})
    return str(path)


def test_profile_comm_of_an_emulated_run_measures_the_regimes_curve(tmp_path):
    regime = _toy_regime_file(tmp_path / "toy.json")
    lancet("profile-comm", "--emulate", f"4:{regime}", "--out", "comm.json", "--reps", "1",
           "--max-bytes", str(MiB), cwd=tmp_path)
    document = json.loads((tmp_path / "comm.json").read_text())
    assert document["identity"]["world_size"] == 4 and document["identity"]["network"] == "emulated:toy"
    assert document["comm"]["shared_directions"] == 0.0
    for nbytes, ms in document["comm"]["curves"]["all_to_all"]:
        # 3/4 of B off-rank on 4 ranks = the 2-rank all-to-all of 1.5 B
        expected = 20.0 + 20.0 * 1.5 * nbytes / MiB
        assert expected <= ms < expected + 600.0  # never faster than the wire; slack for a shared machine
    for nbytes, ms in document["comm"]["curves"]["all_reduce"]:
        expected = 20.0 + 20.0 * 1.5 * nbytes / MiB  # ring: 2 B 3/4 on the link, the 2-rank all-reduce of 1.5 B
        assert expected <= ms < expected + 600.0


def test_train_reports_the_emulated_rank_0_loss(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lancet("train", *MODEL, "--emulate", "4:ib100", "--steps", "1", "--metrics-jsonl", str(metrics), cwd=tmp_path)
    loss = json.loads(metrics.read_text().splitlines()[0])["loss"]
    cfg = model_config("gpt2_moe_nl3_m32_nh2_sl8_b3", vocab_size=97)
    tokens, targets = make_batch_source("synthetic", cfg.batch_size, cfg.seq_len, cfg.vocab_size, 0).batch(0, 0)
    expected, _, _ = tied_reference(cfg, 4, tokens, targets, seed=0)
    assert loss == pytest.approx(expected.item(), rel=1e-5)  # the loss average over ranks is rank 0's loss


def test_bench_rows_say_they_were_emulated(tmp_path):
    measured = {"run": {"spec": {"model": "gpt2_moe_nl3_m32_nh2_sl8_b3", "gate": "switch", "topk": 2,
                                 "capacity_factor": 1.0, "num_experts": None, "vocab_size": 97},
                        "dtype": "fp32", "network": "ib100"},
                "world_size": 2, "source": "made up for the test",
                "results": [{"variant": "captured", "step_ms": 50.0, "trace": {"exposed_a2a_ms": 5.0}}]}
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    result = lancet("bench", *MODEL, "--emulate", "2:ib100", "--variants", "eager,captured", "--steps", "1",
                    "--warmup", "0", "--profile-steps", "0", "--json", "bench.json", "--measured", "measured.json",
                    cwd=tmp_path)
    document = json.loads((tmp_path / "bench.json").read_text())
    assert document["emulated"]["world_size"] == 2 and document["emulated"]["regime"] == "ib100"
    assert "run 3" in document["emulated"]["regime_source"]
    assert [r["emulated"] for r in document["results"]] == ["2:ib100", "2:ib100"]
    assert "emulated 2 ranks on ib100" in result.stdout
    assert "emulated (2:ib100) vs measured (2 GPUs, network ib100)" in result.stdout
