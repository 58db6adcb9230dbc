"""The launcher names the original failure; bench calls differences within the spread noise."""

from __future__ import annotations

import signal

from lancet.app.bench import speedup, quartiles, within_noise
from lancet.runtime.failures import PRIMARY, SECONDARY, FailureRecord, classify, describe_failure, error_line


def _record(rank: int, time: float, kind: str, line: str) -> FailureRecord:
    return FailureRecord(rank, time, kind, line, "")


def test_the_original_error_is_named_not_its_echoes():
    echo = _record(0, 1.0, SECONDARY, "RuntimeError: Connection closed by peer")
    original = _record(1, 2.0, PRIMARY, "InjectedFault: boom")
    assert describe_failure([echo, original], {0: 1, 1: 1}) == "rank 1 failed: InjectedFault: boom"
    killed = {0: 1, 1: -signal.SIGKILL}
    assert describe_failure([echo], killed) == "rank 1 was killed by SIGKILL (out of memory?)"
    stopped_by_launcher = {0: -signal.SIGTERM, 1: -signal.SIGKILL}
    assert describe_failure([], stopped_by_launcher) == "rank 1 was killed by SIGKILL (out of memory?)"
    assert describe_failure([echo], {0: 1}) == "rank 0 failed: RuntimeError: Connection closed by peer"
    assert describe_failure([], {1: 3}) == "rank 1 exited with status 3"


def test_errors_are_classified_and_told_in_one_line():
    assert classify(RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:1234")) == SECONDARY
    assert classify(ValueError("bad value\nsecond line")) == PRIMARY
    assert error_line(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    try:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            raise SystemExit(1)
    except SystemExit as exit_:
        assert error_line(exit_).startswith("BrokenPipeError:") and "output was closed" in error_line(exit_)


def test_bench_marks_differences_within_the_quartiles_as_noise():
    eager = {"variant": "eager", "step_ms": 10.0, "quartiles_ms": quartiles([9.0, 9.5, 10.0, 10.5, 11.0])}
    same = {"variant": "lancet", "step_ms": 7.7, "quartiles_ms": [7.0, 9.6]}
    faster = {"variant": "lancet", "step_ms": 7.7, "quartiles_ms": [7.5, 7.9]}
    assert eager["quartiles_ms"] == [9.5, 10.5]
    assert within_noise(same, eager) and not within_noise(faster, eager)
    assert speedup(same, eager) == "1.299 ~" and speedup(faster, eager) == "1.299"
