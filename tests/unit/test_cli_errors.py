"""Bad input is refused in the launching process, with a message, before any rank starts."""

from __future__ import annotations

import pytest

from lancet.app import cli


@pytest.fixture
def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ranks were launched despite bad input")

    monkeypatch.setattr(cli, "launch", fail)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["--model", "gpt3_dense"], "unknown model 'gpt3_dense'"),
        ("train", ["--num-experts", "3", "--nproc", "2"], "3 experts are not divisible by 2 ranks"),
        ("train", ["--model", "gpt2_moe_nl2_m64_nh4_sl2048_b1"], "longer than the position table"),
        ("train", ["--gate", "topk", "--topk", "5", "--nproc", "2"], "top-5 routing is larger than the number of experts (4)"),
        ("train", ["--data", "/no/such/corpus"], "corpus path '/no/such/corpus' does not exist"),
        ("train", ["--model", "gpt2_moe_nl2_m60_nh8_sl32_b4"], "not divisible by 8 heads"),
        ("train", ["--gc-every", "0"], "--gc-every must be >= 1"),
        ("train", ["--gate", "topk", "--dispatch", "padded"], "the topk gate is dropless"),
        ("bench", ["--variants", "captured,eager,captured"], "captured given more than once; use --rounds"),
        ("bench", ["--variants", "captured", "--rounds", "0"], "--rounds must be >= 1"),
        ("bench", ["--variants", "tutel-dx"], "unknown variant(s) tutel-dx"),
    ],
)
def test_bad_input_is_refused_before_launch(no_launch, capsys, command, argv, message):
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
