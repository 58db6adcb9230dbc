"""Faults injected on purpose, to check that lancet survives them: one rank failing, dying, or going non-finite.

``LANCET_INJECT_FAULT=RANK:STEP[:KIND]`` acts on rank RANK at training step STEP:

- ``raise`` (default): raise an exception at the start of the step;
- ``kill``: the rank kills itself with SIGKILL at the start of the step (no cleanup, no record);
- ``nan``: the rank's gradient of its first expert parameter becomes NaN after the step;
- ``save``: the rank dies (SIGKILL) inside the checkpoint save after STEP completed steps, once every
  rank's data is written; on rank 0 that is before the commit (manifest and rename), so the checkpoint
  stays partial; on another rank, rank 0 may already have committed it (the data is complete).
"""

from __future__ import annotations

import os
import signal

import torch

INJECT_ENV = "LANCET_INJECT_FAULT"
KINDS = ("raise", "kill", "nan", "save")


class InjectedFault(RuntimeError):
    """Raised where ``LANCET_INJECT_FAULT`` asks for it."""


def _fault() -> tuple[int, int, str] | None:
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.lstrip("-").isdigit() for p in parts[:2]) or parts[2:3] not in ([], *[[k] for k in KINDS]):
        raise ValueError(f"{INJECT_ENV}={spec!r}: expected RANK:STEP[:{'|'.join(KINDS)}]")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "raise"


def _matches(rank: int, step: int, kind: str) -> bool:
    fault = _fault()
    return fault is not None and fault == (rank, step, kind)


def maybe_inject_fault(rank: int, step: int) -> None:
    """At the start of a step: raise (``raise``) or die (``kill``) where asked."""
    if _matches(rank, step, "raise"):
        raise InjectedFault(f"fault injected on rank {rank} at step {step} ({INJECT_ENV}={os.environ[INJECT_ENV]})")
    if _matches(rank, step, "kill"):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_gradients(rank: int, step: int, grads: list[torch.Tensor], names: list[str]) -> None:
    """``nan``: fill this rank's gradient of its first expert parameter with NaN."""
    if _matches(rank, step, "nan"):
        index = next(i for i, name in enumerate(names) if ".experts." in name)
        grads[index] = torch.full_like(grads[index], float("nan"))


def maybe_crash_in_save(rank: int, step: int) -> None:
    """``save``: die between writing the checkpoint's data and committing it."""
    if _matches(rank, step, "save"):
        os.kill(os.getpid(), signal.SIGKILL)
