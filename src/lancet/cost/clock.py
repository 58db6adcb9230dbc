"""Timing repeated calls: device time through CUDA events on the current stream, host time alongside.

With ``queue_ahead`` (node profiling) the timed calls are queued behind a spin
kernel long enough for the host to enqueue all of them, so the events measure
the kernels back to back (device time without launch gaps); the host's time to
issue the calls is measured separately. Small kernels would otherwise be timed
at the host's launch rate, which the simulator already models on its host lane.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Clock:
    """Times ``reps`` back-to-back calls; GPU time via CUDA events, else host time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._cycles_per_ms: float | None = None

    def _spin_cycles_per_ms(self) -> float:
        if self._cycles_per_ms is None:
            cycles = 10_000_000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles_per_ms = cycles / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms

    def _queue_ahead(self, fn: Callable[[], object], reps: int) -> None:
        """Keep the device busy for longer than the host needs to issue ``reps`` calls of ``fn``."""
        begin = time.perf_counter()
        fn()
        issue_ms = (time.perf_counter() - begin) * 1e3
        torch.cuda.synchronize()
        torch.cuda._sleep(int(self._spin_cycles_per_ms() * min(2.0 * issue_ms * reps + 0.2, 50.0)))

    def time_ms(self, fn: Callable[[], object], reps: int, queue_ahead: bool = False) -> tuple[float, float]:
        """(device ms, host ms) per call: kernel time, and the host's time to issue one call."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if queue_ahead:
                self._queue_ahead(fn, reps)
            start.record()
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            host = (time.perf_counter() - begin) * 1e3 / reps
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / reps, host
        begin = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - begin) * 1e3 / reps
        return host, host

    def host_ms(self, fn: Callable[[], object], reps: int) -> float:
        begin = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - begin) * 1e3 / reps

    def device_ms(self, fn: Callable[[], object], reps: int) -> float:
        """Device time per call (host time on the CPU)."""
        return self.time_ms(fn, reps)[0]
