"""Kernel families: a kernel's name without what varies between launches of the same code."""

from __future__ import annotations

import re

_NOISE = re.compile(r"<.*>|\(.*\)|_\d+$|_[0-9a-f]{6,}")


def kernel_family(name: str) -> str:
    """A kernel name without template arguments, signatures and Inductor's numbered suffixes, cut to 60."""
    stem = _NOISE.sub("", name)
    stem = re.sub(r"(triton_\w+?_fused)_.*", r"\1", stem)
    return stem[:60]
