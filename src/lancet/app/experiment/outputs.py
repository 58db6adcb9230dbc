"""What the output folder keeps, and how it travels between machines.

Profiler traces are gzipped or dropped after each step (``keep_traces``). ``pack`` writes the whole
folder as one .tar.gz (for machines that return only a few files) and ``restore`` unpacks one
into a folder, so a later run there goes on where the packed one stopped.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

from rich.console import Console

from lancet.app.experiment.spec import ExperimentError

TRACE_POLICIES = ("all", "rank0", "none")


def keep_traces(folder: Path, policy: str) -> None:
    """Apply the trace policy to a finished step's trace folders: gzip what is kept, delete the rest."""
    for traces in (folder / "traces", folder / "pred"):
        if not traces.is_dir():
            continue
        if policy == "none":
            shutil.rmtree(traces)
            continue
        for path in sorted(traces.rglob("*.json")):
            if policy == "rank0" and path.name.startswith("rank") and path.name != "rank0.json":
                path.unlink()
                continue
            with open(path, "rb") as src, gzip.open(path.with_name(path.name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()


def pack(out: Path, archive: Path, console: Console) -> None:
    """The whole output folder as one .tar.gz, written atomically."""
    archive = archive.resolve()
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=".")
    partial.replace(archive)
    console.print(f"archive -> {archive} ({archive.stat().st_size / 2**20:.1f} MiB)", highlight=False)


def restore(archive: Path, out: Path) -> None:
    """Unpack an archive of an earlier run into ``out`` (its files replace those of the same name)."""
    if not archive.is_file():
        raise ExperimentError(str(archive), None, None, "--resume-from: no such archive")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(out, filter="data")
