"""One hardware work queue per GPU by default (``CUDA_DEVICE_MAX_CONNECTIONS=1``) for the command line's ranks.

With the CUDA default (8 queues) the replayed forward of a step waits longer between kernels: on one
H200 one queue took about half of the forward's idle away and 0.7-2.7% off the step, and with an emulated
8-rank network it kept the overlap of all-to-all and compute (docs/results.md, run 18). The driver reads the
variable when a process first touches CUDA, so ``lancet``'s commands set it before anything else runs, and
the ranks they launch inherit it. A value the user exported is kept (``CUDA_DEVICE_MAX_CONNECTIONS=8``
restores the CUDA default); the Python API leaves the environment alone.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
DEFAULT = "1"


def default_hardware_queues(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless it is set; return the value in force.

    A value that is not a positive integer raises ``ValueError`` (the driver would ignore it silently).
    """
    value = environ.setdefault(ENV, DEFAULT).strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV} must be a positive integer, got {value!r}")
    return value


def hardware_queues(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The value in force, for records (None: the CUDA default)."""
    return environ.get(ENV)
