"""Garbage collection runs only where the schedule says, and the previous state comes back."""

from __future__ import annotations

import gc

import pytest

from lancet.app import gc_policy
from lancet.app.gc_policy import ScheduledCollection


def test_collection_only_every_n_steps_and_state_restored(monkeypatch):
    calls = []
    monkeypatch.setattr(gc_policy.gc, "collect", lambda *args: calls.append(args))
    assert gc.isenabled()
    with ScheduledCollection(every=3) as collection:
        assert not gc.isenabled()
        entered = len(calls)
        for step in range(7):
            collection.after_step(step)
        assert calls[entered:] == [(1,), (1,)]  # after steps 2 and 5
    assert gc.isenabled()


def test_disabled_collection_stays_disabled():
    gc.disable()
    try:
        with ScheduledCollection(every=1):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bad_period_refused():
    with pytest.raises(ValueError, match="every N >= 1"):
        ScheduledCollection(every=0)
