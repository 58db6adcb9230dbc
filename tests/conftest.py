"""Test tiers, as markers: unit (one process, seconds), compile (one process, Inductor on the CPU), multirank (gloo
ranks), e2e (the CLI end to end), gpu.

Each test gets the marker of its folder unless it carries a tier marker of its own. The fast tier is
``pytest -m unit``; GPU tests skip where there is no CUDA device.
"""

from __future__ import annotations

import os

import pytest
import torch

# Inductor compiles C++ on the CPU; on the 2 cores tests run on, a pool of compile workers only competes with
# the ranks (inherited by spawned ranks and by the command-line runs).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

TIERS = ("unit", "compile", "multirank", "e2e", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        folder = item.path.parent.name
        if folder in TIERS:
            item.add_marker(getattr(pytest.mark, folder))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
