"""Interval arithmetic on (start, end) pairs: union, length, difference."""

from __future__ import annotations

from collections.abc import Iterable

Interval = tuple[float, float]
Intervals = list[Interval]


def merge_intervals(intervals: Iterable[Interval]) -> Intervals:
    """Sorted, disjoint union of ``intervals``; empty and inverted intervals are dropped."""
    merged: Intervals = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total_length(intervals: Iterable[Interval]) -> float:
    """Length of the union of ``intervals`` (overlaps counted once)."""
    return sum(end - start for start, end in merge_intervals(intervals))


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> Intervals:
    """The parts of ``a`` not covered by ``b``, as sorted disjoint intervals."""
    a, b = merge_intervals(a), merge_intervals(b)
    out: Intervals = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        cursor, k = start, j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out
