"""Timing repeated calls: device time through CUDA events on the current stream, host time alongside."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class Clock:
    """Times ``reps`` back-to-back calls; GPU time via CUDA events, else host time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time_ms(self, fn: Callable[[], object], reps: int) -> tuple[float, float]:
        """(device ms, host ms) per call: kernel time, and the host's time to issue one call."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
