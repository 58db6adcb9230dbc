"""Measuring steps: profiler-trace metrics, timelines, rank skew."""
