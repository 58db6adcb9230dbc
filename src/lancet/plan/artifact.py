"""Versioned JSON artifacts (profiles, comm profiles, plans) and the run they belong to.

Every file records what it was made for (model, gate, world size, dtype,
device, network regime, torch version). Loading one for a run that differs in a
field that matters for that kind of file is refused, naming each difference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 1


class ArtifactMismatch(ValueError):
    """An artifact was made for a different run (or is not an artifact of the expected kind)."""


@dataclass(frozen=True, slots=True)
class RunIdentity:
    model: str
    gate: str
    """Gate and dispatch, e.g. ``switch_padded`` or ``topk2_ragged``, with the capacity factor when not 1."""
    world_size: int
    dtype: str
    device: str
    """Device type and name, e.g. ``cuda:NVIDIA H200`` or ``cpu``."""
    network: str
    torch_version: str

    def to_json(self) -> dict:
        return asdict(self)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def gate_description(gate) -> str:
    """``switch_padded``, ``batch_prioritized_cf1.25_ragged``, ``topk2_ragged``: what routing and dispatch a run uses.

    ``gate`` is a ``lancet.moe.GateConfig`` (its dispatch resolved). Profiles and plans made for one dispatch
    are refused for the other: the graphs and the drop semantics of partitions differ.
    """
    name = f"topk{gate.topk}" if gate.kind == "topk" else gate.kind
    if gate.capacity_factor != 1.0:
        name = f"{name}_cf{gate.capacity_factor:g}"
    return f"{name}_{gate.dispatch}"


MATCH_FIELDS = {
    "profile": ("model", "gate", "world_size", "dtype", "device", "torch_version"),
    "comm": ("world_size", "device", "network", "torch_version"),
    "plan": ("model", "gate", "world_size", "dtype", "device", "network", "torch_version"),
}


def write_artifact(path: str | Path, kind: str, identity: RunIdentity, payload: dict) -> None:
    document = {"format": "lancet", "version": FORMAT_VERSION, "kind": kind, "identity": identity.to_json(), **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(document, f, indent=1)
    tmp.replace(path)


def read_artifact(path: str | Path, kind: str, expected: RunIdentity | None = None) -> dict:
    """Load an artifact of ``kind``; with ``expected``, refuse one made for a different run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
    with open(path) as f:
        document = json.load(f)
    if document.get("format") != "lancet" or document.get("kind") != kind:
        raise ArtifactMismatch(f"{path} is not a lancet {kind} file")
    if document.get("version") != FORMAT_VERSION:
        raise ArtifactMismatch(f"{path} has format version {document.get('version')}, this lancet reads {FORMAT_VERSION}")
    if expected is not None:
        check_identity(document["identity"], expected, kind, str(path))
    return document


def check_identity(recorded: dict, expected: RunIdentity, kind: str, source: str) -> None:
    wanted = expected.to_json()
    differences = [
        f"{field}: file has {recorded.get(field)!r}, run has {wanted[field]!r}"
        for field in MATCH_FIELDS[kind]
        if recorded.get(field) != wanted[field]
    ]
    if differences:
        raise ArtifactMismatch(f"{kind} {source} was made for a different run:\n  " + "\n  ".join(differences))


def identity_from_json(data: dict) -> RunIdentity:
    return RunIdentity(**data)
