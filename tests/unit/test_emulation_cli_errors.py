"""Bad emulation input is refused in the launching process, before the emulated rank starts."""

from __future__ import annotations

import json

import pytest

from lancet.app import cli


@pytest.fixture
def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the rank was launched despite bad input")

    monkeypatch.setattr(cli, "launch", fail)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["--emulate", "4:ib100", "--nproc", "2"], "--emulate runs one process"),
        ("train", ["--emulate", "4:ib100", "--network", "ib100"], "leave --network out"),
        ("train", ["--emulate", "4:ib200"], "neither a shipped regime"),
        ("train", ["--emulate", "four:ib100"], "--emulate takes W:REGIME"),
        ("train", ["--emulate", "1:ib100"], "at least 2 ranks"),
        ("train", ["--emulate", "3:ib100", "--num-experts", "4"], "4 experts are not divisible by 3 ranks"),
        ("profile", ["--emulate", "4:ib100", "--out", "p.json", "--emulate-sms", "0"], "--emulate-sms must be >= 1"),
        ("bench", ["--variants", "eager", "--measured", "/no/such.json"], "does not exist"),
    ],
)
def test_bad_emulation_input_is_refused(no_launch, capsys, command, argv, message):
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def _bench_document(model: str, world: int, emulate: str | None = None) -> dict:
    run = {"spec": {"model": model, "gate": "switch", "topk": 2, "capacity_factor": 1.0}, "dtype": "fp32",
           "network": "ib100", "emulate": emulate}
    return {"run": run, "world_size": world, "results": []}


@pytest.mark.parametrize(
    "document, extra, message",
    [
        (_bench_document("tiny", 4), [], "--measured compares an emulated bench"),
        (_bench_document("tiny", 2), ["--emulate", "4:ib100"], "world size: measured 2, emulated 4"),
        (_bench_document("cpu_small", 4), ["--emulate", "4:ib100"], "model: measured 'gpt2_moe_nl2_m64_nh4_sl32_b4'"),
        (_bench_document("tiny", 4, emulate="4:ib100"), ["--emulate", "4:ib100"], "itself an emulated bench"),
    ],
)
def test_measured_bench_of_another_configuration_is_refused(no_launch, capsys, tmp_path, document, extra, message):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps(document))
    argv = ["bench", "--model", "tiny", "--variants", "eager", "--measured", str(measured), *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
