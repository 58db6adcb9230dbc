"""Network regimes an emulated run can be priced by: shipped curves, or a user's own ``lancet profile-comm`` file.

The shipped regimes (``nvlink``, ``ib400``, ``ib100``, ``eth``) are comm profiles in the format
``lancet profile-comm`` writes, kept in ``lancet/cost/curves`` with a ``source`` record saying what
was measured where and what was derived. ``nvlink``, ``ib400`` and ``ib100`` come from the
measured all-to-all points of docs/results.md run 3 (4 x H200); their all-reduce curves are
derived from the all-to-all. ``eth`` was never measured: it is derived from the 2-4 GB/s per GPU
that DESIGN.md gives, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lancet.cost.comm import CommProfile
from lancet.plan.artifact import ArtifactMismatch, read_artifact

SHIPPED_REGIMES = ("nvlink", "ib400", "ib100", "eth")


@dataclass(frozen=True, slots=True)
class Regime:
    """Collective cost curves of one network and where they come from."""

    name: str
    """A shipped regime's name, or the stem of the user's file."""
    comm: CommProfile
    measured_world: int
    """Ranks the curves were measured (or, for derived ones, stated) for."""
    source: str
    """One line of provenance: measured where, or derived from what."""
    path: str
    sms: int | None = None
    """SMs NCCL kept busy for a collective under this regime (its channels), where known."""


def _shipped_path(name: str) -> Path:
    return Path(str(resources.files("lancet.cost").joinpath("curves", f"{name}.json")))


def _source_line(document: dict, path: Path) -> str:
    source = document.get("source")
    if isinstance(source, dict) and source.get("summary"):
        return str(source["summary"])
    identity = document["identity"]
    return (f"{path}: lancet profile-comm on {identity['world_size']} ranks of {identity['device']}, "
            f"network {identity['network']}, torch {identity['torch_version']}")


def load_regime(spec: str) -> Regime:
    """The regime named ``spec`` (a shipped name) or stored at path ``spec`` (a ``lancet profile-comm`` JSON).

    Raises ValueError for an unknown name, a file that is not a comm profile, or curves measured on
    fewer than 2 ranks or without an all-to-all and an all-reduce curve; FileNotFoundError for a
    missing file.
    """
    shipped = spec in SHIPPED_REGIMES
    path = _shipped_path(spec) if shipped else Path(spec)
    if not shipped and not path.exists():
        raise FileNotFoundError(
            f"network regime {spec!r} is neither a shipped regime ({', '.join(SHIPPED_REGIMES)}) nor an existing "
            "`lancet profile-comm` JSON file"
        )
    try:
        document = read_artifact(path, "comm")
    except ArtifactMismatch as err:
        raise ValueError(f"network regime {spec!r}: {err}") from None
    comm = CommProfile.from_json(document["comm"])
    world = int(document["identity"]["world_size"])
    missing = [kind for kind in ("all_to_all", "all_reduce") if kind not in comm.curves]
    if world < 2 or missing:
        problem = f"was measured on {world} rank(s)" if world < 2 else f"has no {' or '.join(missing)} curve"
        raise ValueError(f"network regime {spec!r} {problem}; emulation needs curves of at least 2 ranks")
    sms = document.get("standin_sms")
    return Regime(name=spec if shipped else path.stem, comm=comm, measured_world=world,
                  source=_source_line(document, path), path=str(path), sms=int(sms) if sms is not None else None)
