"""Kernel families: a kernel's name without what varies between launches of the same code."""

from __future__ import annotations

import re

_NOISE = re.compile(r"<.*>|\(.*\)|_\d+$|_[0-9a-f]{6,}")


def kernel_stem(name: str) -> str:
    """A kernel name without template arguments, signatures and numbered or hashed suffixes."""
    return _NOISE.sub("", name)


def kernel_family(name: str) -> str:
    """``kernel_stem`` with Inductor's fused-op names folded into their kind (``triton_poi_fused``), cut to 60."""
    return re.sub(r"(triton_\w+?_fused)_.*", r"\1", kernel_stem(name))[:60]
