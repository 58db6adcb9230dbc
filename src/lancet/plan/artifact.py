"""Versioned JSON artifacts (profiles, comm profiles, plans) and the run they belong to.

Every file records what it was made for (model, gate, world size, dtype,
device, network regime, torch version). Loading one for a run that differs in a
field that matters for that kind of file is refused, naming each difference.

Every file also carries the sha256 of its content (``checksum``, over the
document without it, keys sorted): a truncated, corrupted or hand-edited file
is refused with a message saying so, instead of failing somewhere later or,
worse, running a schedule nobody planned. Every refusal is an ``ArtifactError``
(a ValueError) with a one-line first line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FORMAT_VERSION = 2
"""2: with a checksum of the content."""


class ArtifactError(ValueError):
    """An artifact cannot be used: unreadable, not lancet's, modified, or made for another run."""


class ArtifactMismatch(ArtifactError):
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


def content_checksum(document: dict) -> str:
    """sha256 of the document without its ``checksum`` field (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in document.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


MANIFEST_ENV = "LANCET_MANIFEST"
"""Set by ``lancet experiment run`` for the commands it starts: the run manifest every artifact names."""


def write_artifact(path: str | Path, kind: str, identity: RunIdentity, payload: dict) -> None:
    document = {"format": "lancet", "version": FORMAT_VERSION, "kind": kind, "identity": identity.to_json(), **payload}
    if os.environ.get(MANIFEST_ENV):
        document["manifest"] = os.environ[MANIFEST_ENV]
    document["checksum"] = content_checksum(document)
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
    if path.is_dir():
        raise ArtifactError(f"{kind} file {str(path)!r} is a folder")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{kind} file {str(path)!r} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{kind} file {str(path)!r} is not valid JSON (truncated or corrupted?): {err}") from None
    if not isinstance(document, dict) or document.get("format") != "lancet":
        raise ArtifactMismatch(f"{path} is not a lancet {kind} file")
    if document.get("kind") != kind:
        raise ArtifactMismatch(f"{path} is not a lancet {kind} file (it is a {document.get('kind')} file)")
    if document.get("version") != FORMAT_VERSION:
        raise ArtifactMismatch(f"{path} has format version {document.get('version')}, this lancet reads "
                               f"{FORMAT_VERSION}: make it again with this lancet")
    if document.get("checksum") != content_checksum(document):
        raise ArtifactError(f"{path} was modified after lancet wrote it (its checksum does not match its content); "
                            "make it again instead of editing it")
    if not isinstance(document.get("identity"), dict):
        raise ArtifactError(f"{path} has no run identity")
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
        raise ArtifactMismatch(f"{kind} {source} was made for a different run: " + "; ".join(differences))


def identity_from_json(data: dict) -> RunIdentity:
    return RunIdentity(**data)
