"""The forward's idle from a bench row: a timed replay (or one with the host ahead) less the profiled busy time."""

from __future__ import annotations

from lancet.app.bench import held_forward_idle_ms, unprofiled_forward_idle_ms


def _row(**extra) -> dict:
    return {"trace": {"forward_gpu_ms": 10.0, "forward_idle_ms": 1.0}, **extra}


def test_idle_is_the_replay_less_the_profiled_busy_time():
    row = _row(replay_ms={"forward": 9.6, "backward": 20.0}, held_forward_ms=9.2)
    assert unprofiled_forward_idle_ms(row) == (9.6, 9.0, 9.6 - 9.0)
    held, busy, idle = held_forward_idle_ms(row)
    assert (held, busy) == (9.2, 9.0) and abs(idle - 0.2) < 1e-12


def test_rows_without_a_replay_or_a_profile_have_no_idle():
    assert unprofiled_forward_idle_ms(_row()) is None and held_forward_idle_ms(_row()) is None
    assert held_forward_idle_ms({"held_forward_ms": 9.2, "trace": {}}) is None
    assert unprofiled_forward_idle_ms({"replay_ms": {"forward": 9.6}}) is None
