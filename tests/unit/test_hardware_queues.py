"""The command line's default of one hardware queue, kept when the user set a value, refused when malformed."""

from __future__ import annotations

import os

import pytest

from lancet.app.cli import main
from lancet.runtime.hardware_queues import ENV, default_hardware_queues, hardware_queues

pytestmark = pytest.mark.unit


def test_unset_becomes_one_and_a_set_value_is_kept():
    environ: dict[str, str] = {}
    assert default_hardware_queues(environ) == "1" and environ == {ENV: "1"}
    environ = {ENV: "8"}
    assert default_hardware_queues(environ) == "8" and hardware_queues(environ) == "8"
    assert hardware_queues({}) is None


@pytest.mark.parametrize("value", ["0", "eight", "-1", ""])
def test_a_malformed_value_is_refused(value):
    with pytest.raises(ValueError, match=ENV):
        default_hardware_queues({ENV: value})


def test_the_command_line_sets_it_before_running(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert main(["inspect", "--model", "no_such_model"]) == 2  # fails on the model, after the default is set
    assert os.environ[ENV] == "1"
    monkeypatch.setenv(ENV, "zero")
    assert main(["inspect"]) == 2
    assert f"{ENV} must be a positive integer" in capsys.readouterr().err
