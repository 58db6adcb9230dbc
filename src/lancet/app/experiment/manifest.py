"""The manifest of one driver run: what code ran where, with which settings.

One file per run of ``lancet experiment run`` (``manifests/<run id>.json``): the command line, the
experiment file (path, hash, text), the code (git commit and whether the tree was dirty, and a
hash of lancet's sources, which holds where there is no git checkout), Python/torch/CUDA/NCCL
versions, GPU names and count, the host, and the NCCL-related environment. Every step's
done-marker and every JSON file a step writes name the manifest of the run that made them.

Device facts are read in a child process (``python -m lancet.app.experiment.manifest``) so the
driver itself never opens a CUDA context.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL", "TORCH_SYMM_MEM", "NVSHMEM_", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_MAX")


def new_run_id() -> str:
    """Start time and a random suffix: sorts by time, unique across machines."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def build_manifest(run_id: str, experiment_file: Path, argv: list[str], env: dict[str, str],
                   budget_s: float | None) -> dict:
    """Everything the run's results depend on besides the experiment lines themselves."""
    text = experiment_file.read_text()
    return {
        "format": "lancet", "kind": "experiment-manifest", "version": 1,
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": {"argv": argv, "line": shlex.join(argv), "cwd": os.getcwd()},
        "experiment_file": {"path": str(experiment_file), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                            "text": text},
        "budget_s": budget_s,
        "code": code_identity(),
        "platform": device_facts(env),
        "env": {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES)},
    }


def code_identity() -> dict:
    """Git commit and dirtiness of the checkout lancet runs from (when it is one), and a hash of its sources."""
    package = Path(__file__).resolve().parents[2]
    sources = sorted(package.rglob("*.py"))
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return {"commit": _git(package, "rev-parse", "HEAD"), "dirty": _dirty(package),
            "source_sha256": digest.hexdigest(), "source_files": len(sources)}


def _git(where: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _dirty(where: Path) -> bool | None:
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def device_facts(env: dict[str, str]) -> dict:
    """Versions, GPUs and host, read by a child process with the steps' environment."""
    done = subprocess.run([sys.executable, "-m", "lancet.app.experiment.manifest"], capture_output=True, text=True,
                          env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"could not read the platform for the manifest: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def _local_facts() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "system": platform.platform(),
    }


if __name__ == "__main__":
    print(json.dumps(_local_facts()))
