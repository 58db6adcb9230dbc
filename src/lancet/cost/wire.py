"""The wire of an emulated cluster: what one rank's collective costs on a measured network.

A network regime's curves (``lancet profile-comm``) give the time of an all-to-all with even
splits of B bytes per rank, and of an all-reduce of B bytes per rank, on the ``measured_world``
ranks they were measured with. A collective of one rank of a ``world``-rank job is priced by the
bytes that cross that rank's link, so a job of 8 ranks uses the same link model as one of 4:

- all-to-all: the X bytes a rank sends to other ranks (its own block never leaves it) cost what
  the measured even all-to-all that sends X bytes off-rank cost, the one of
  ``B = X * Wm / (Wm - 1)`` bytes per rank (Wm = ``measured_world``);
- all-reduce (ring) of B bytes on W ranks moves ``2 B (W - 1) / W`` bytes over each rank's link;
  it costs what the measured all-reduce with the same link bytes cost, the one of
  ``B * ((W - 1) / W) / ((Wm - 1) / Wm)`` bytes per rank.

Below the smallest measured size the curves extrapolate their first segment (never below 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from lancet.cost.comm import CommProfile


@dataclass(frozen=True, slots=True)
class Wire:
    """Prices the collectives of one rank of a ``world``-rank job from curves measured on ``measured_world`` ranks."""

    comm: CommProfile
    measured_world: int
    world: int

    def __post_init__(self) -> None:
        if self.measured_world < 2:
            raise ValueError(f"curves measured on {self.measured_world} rank(s) carry no off-rank traffic; need >= 2")
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        missing = [k for k in ("all_to_all", "all_reduce") if k not in self.comm.curves]
        if missing:
            raise ValueError(f"the regime has no curve for {', '.join(missing)}")

    def all_to_all_ms(self, offrank_bytes: float) -> float:
        """Time of an all-to-all in which this rank sends ``offrank_bytes`` to other ranks."""
        if self.world < 2:
            return 0.0
        measured = self.measured_world
        return self.comm.ms("all_to_all", offrank_bytes * measured / (measured - 1))

    def all_reduce_ms(self, nbytes: float) -> float:
        """Time of a (ring) all-reduce of ``nbytes`` per rank."""
        if self.world < 2:
            return 0.0
        measured = self.measured_world
        link_share = (self.world - 1) / self.world
        return self.comm.ms("all_reduce", nbytes * link_share * measured / (measured - 1))
