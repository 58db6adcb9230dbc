"""What the ranks agree on after every step, in one small all-reduce: the loss, non-finite values, a stop request.

Per step each rank contributes ``[local loss, non-finite count, stop requested]``;
the sum gives the global mean loss, whether any rank saw a non-finite loss or
gradient, and whether any rank was asked to stop (Ctrl-C). Every rank gets the
same sums, so every rank takes the same decision at the same step: apply the
update, skip it, stop training, or stop after saving. Deciding alone would leave
the other ranks waiting in the next step's collectives.

Non-finite values: the loss and each gradient's norm (``torch._foreach_norm``,
one fused pass; a norm is finite exactly when every element is, barring overflow
of the squares beyond ~1e19) are checked before the optimizer runs. With
``--nonfinite stop`` (default) training stops with the step and the first
offending tensor named; with ``skip`` the step's update is not applied and
training goes on. Naming the tensor costs one ``all_gather_object``, only on a
step that has a non-finite value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient with ``--nonfinite stop``."""


@dataclass(frozen=True, slots=True)
class Verdict:
    loss: float
    """Mean over ranks of the step's loss."""
    skip: bool
    """Do not apply this step's update (a non-finite value under ``skip``)."""
    stop: bool
    """Every rank stops after this step (a stop was requested)."""
    nonfinite: str | None = None
    """What was non-finite, naming the step, tensor and rank (None: all finite)."""


def first_nonfinite(loss: torch.Tensor, grads: list[torch.Tensor], names: list[str]) -> str | None:
    """The first non-finite value of this rank: ``loss`` or a parameter name; None when all are finite."""
    if not torch.isfinite(loss).all():
        return "loss"
    finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).tolist()
    return next((f"gradient of {names[i]}" for i, ok in enumerate(finite) if not ok), None)


class StepGuard:
    """The per-step agreement of all ranks on ``group`` (see the module contract)."""

    def __init__(self, names: list[str], policy: str, group: dist.ProcessGroup, device: torch.device) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"unknown non-finite policy {policy!r}; choose one of {', '.join(NONFINITE_POLICIES)}")
        self.names = names
        self.policy = policy
        self.group = group
        self.device = device

    def check(self, step: int, loss: torch.Tensor, grads: list[torch.Tensor], stop_requested: bool) -> Verdict:
        """Collective: agree on this step's outcome; raises NonFiniteError (on every rank) under ``stop``."""
        loss = loss.detach().float()
        bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).sum()
        local = torch.stack([loss, bad, torch.tensor(float(stop_requested), device=loss.device)])
        summed = local.to(self.device)
        dist.all_reduce(summed, group=self.group)
        total_loss, total_bad, stops = summed.tolist()
        world = dist.get_world_size(self.group)
        nonfinite = self._describe(step, loss, grads) if total_bad > 0 else None
        if nonfinite is not None and self.policy == "stop":
            raise NonFiniteError(f"{nonfinite}; stopping (--nonfinite skip skips such steps instead)")
        return Verdict(loss=total_loss / world if math.isfinite(total_loss) else float("nan"),
                       skip=nonfinite is not None, stop=stops > 0, nonfinite=nonfinite)

    def _describe(self, step: int, loss: torch.Tensor, grads: list[torch.Tensor]) -> str:
        found: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(found, first_nonfinite(loss, grads, self.names), group=self.group)
        rank, what = next((r, w) for r, w in enumerate(found) if w is not None)
        return f"non-finite {what} at step {step} (rank {rank})"
