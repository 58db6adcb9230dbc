"""Training checkpoints with torch.distributed.checkpoint (DCP): save, find the latest, resume.

Layout of ``--checkpoint-dir DIR``::

    DIR/step_00000040/          a complete checkpoint after 40 optimizer steps
        .metadata, __R_0.distcp   DCP's files (every rank writes its own)
        lancet.json               what the checkpoint belongs to; written last
    DIR/step_00000050.partial/  a save in progress, or one that died: never loaded

What is saved: the model (expert tensors as DTensors sharded over the ranks,
``Shard(0)`` along the expert dim, so each rank writes its own experts; dense
tensors are identical on every rank and DCP writes them once), the optimizer
state keyed by parameter name (``torch.distributed.checkpoint.state_dict``),
each rank's RNG state, and the number of completed steps, which is the data
position (batches are a pure function of seed, step and rank).

Contract: a save is atomic. Every rank writes into ``step_N.partial``; DCP's
``save`` ends with a collective, so when it returns every rank's data is on
disk; rank 0 then writes ``lancet.json`` and renames the folder to ``step_N``.
A crash before the rename leaves the previous checkpoint the latest complete
one. Resuming refuses a checkpoint made for another run (model, gate, world
size, dtype, optimizer, learning rate, seed, data, plan), listing each
difference. Another world size is refused rather than resharded: the data each
rank reads, the expert count (2 per rank by default) and the plan all depend on
it, so the continued run would not be the run that was checkpointed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lancet.step.train_step import expert_parameter_names

CHECKPOINT_VERSION = 1
MANIFEST = "lancet.json"
PARTIAL = ".partial"
KEEP = 2
"""Complete checkpoints kept; older ones are deleted after a successful save."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (another run's, or unreadable)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("step_") and name[5:].isdigit() and (path / MANIFEST).is_file():
            found.append((int(name[5:]), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder} is unreadable ({err}); delete it to resume from an earlier one")
    if manifest.get("format") != "lancet-checkpoint" or manifest.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{folder} is not a lancet checkpoint of version {CHECKPOINT_VERSION}")
    return manifest


def check_manifest(manifest: dict, identity: dict, folder: Path) -> None:
    """Raise CheckpointError listing every field in which the checkpoint's run differs from this run."""
    recorded = manifest.get("identity", {})
    differences = [
        f"{key}: checkpoint has {recorded.get(key)!r}, run has {value!r}"
        for key, value in identity.items()
        if recorded.get(key) != value
    ]
    if differences:
        raise CheckpointError(f"checkpoint {folder} was made by a different run: " + "; ".join(differences))


@dataclass(slots=True)
class Checkpointer:
    """Saves and restores one rank's training state; every method is collective over ``group``."""

    root: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    group: dist.ProcessGroup
    device: torch.device
    identity: dict
    """What a checkpoint must match to be resumed by this run (JSON values)."""

    def _state(self) -> dict:
        """The DCP state dict: model and optimizer (experts as sharded DTensors), RNG, step."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        experts = expert_parameter_names(self.model)
        mesh = _mesh(self.group, self.device)
        model_state = {k: _shard(v, mesh) if k in experts else v for k, v in model_state.items()}
        optim_state["state"] = {
            name: {k: _shard(v, mesh) if name in experts and v.dim() > 0 else v for k, v in entry.items()}
            for name, entry in optim_state["state"].items()
        }
        rank = dist.get_rank(self.group)
        rng = {f"cpu.rank{rank}": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng[f"cuda.rank{rank}"] = torch.cuda.get_rng_state(self.device)
        return {"model": model_state, "optim": optim_state, "rng": rng, "progress": {"step": 0}}

    def save(self, step: int) -> Path:
        """Checkpoint the state after ``step`` completed steps; returns the complete folder."""
        final = step_dir(self.root, step)
        partial = final.with_name(final.name + PARTIAL)
        rank = dist.get_rank(self.group)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier(group=self.group)
        state = self._state()
        state["progress"]["step"] = step
        dcp.save(state, checkpoint_id=str(partial), process_group=self.group)
        from lancet.app.faults import maybe_crash_in_save

        maybe_crash_in_save(rank, step)
        if rank == 0:
            manifest = {"format": "lancet-checkpoint", "version": CHECKPOINT_VERSION, "step": step,
                        "identity": self.identity}
            _write_synced(partial / MANIFEST, json.dumps(manifest, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _sync_dir(self.root)
            self._prune()
        dist.barrier(group=self.group)
        return final

    def load(self, folder: Path) -> int:
        """Restore model, optimizer and RNG from ``folder`` (in place); returns the completed steps."""
        manifest = read_manifest(folder)
        check_manifest(manifest, self.identity, folder)
        state = self._state()
        try:
            dcp.load(state, checkpoint_id=str(folder), process_group=self.group)
        except Exception as err:  # DCP raises its own CheckpointException, wrapping each rank's error
            raise CheckpointError(f"checkpoint {folder} could not be read: {str(err).strip().splitlines()[0]}") from err
        model_state = {k: _local(v) for k, v in state["model"].items()}
        optim_state = state["optim"]
        optim_state["state"] = {n: {k: _local(v) for k, v in e.items()} for n, e in optim_state["state"].items()}
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        rank = dist.get_rank(self.group)
        torch.set_rng_state(state["rng"][f"cpu.rank{rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][f"cuda.rank{rank}"], self.device)
        return int(state["progress"]["step"])

    def _prune(self) -> None:
        """Keep the newest ``KEEP`` complete checkpoints; drop stale partial ones (rank 0)."""
        for _, path in complete_checkpoints(self.root)[:-KEEP]:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"step_*{PARTIAL}"):
            shutil.rmtree(path, ignore_errors=True)


def _mesh(group: dist.ProcessGroup, device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device.type)


def _shard(tensor: torch.Tensor, mesh):
    """This rank's experts as its shard of the global expert tensor (dim 0); shares storage."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(tensor, mesh, [Shard(0)], run_check=False)


def _local(value):
    from torch.distributed.tensor import DTensor

    return value.to_local() if isinstance(value, DTensor) else value


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
