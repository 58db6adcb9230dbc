"""Checks run in the launching process before any rank starts: every bad input becomes one ValueError line.

Each check raises ``ValueError`` (or ``FileNotFoundError``) with a message that
names the flag and what to do; ``lancet.app.cli`` prints it as one line and
exits with status 2. The ranks repeat the checks that matter for correctness
(identities of plans and checkpoints), so runs under torchrun are refused too,
only later.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lancet.app.checkpoint import CheckpointError, check_manifest, latest_checkpoint, read_manifest
from lancet.app.config import RunConfig, checkpoint_identity
from lancet.app.data import SYNTHETIC, resolve_corpus_path
from lancet.plan.artifact import ArtifactError, RunIdentity
from lancet.runtime.inductor_options import inductor_options
from lancet.runtime.inline_collectives import inline_from_environment


def launcher_device() -> torch.device:
    """The device rank 0 will use (for identities checked before launch)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_output_file(path: str | None, flag: str) -> None:
    """``path`` can be created or overwritten as a file."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is a folder; give a file path")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path!r}: folder {str(folder)!r} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path!r} is not writable")
    if not target.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: folder {str(folder)!r} is not writable")


def check_output_dir(path: str | None, flag: str) -> None:
    """``path`` is a writable folder, or can be created as one."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path!r} is a file; give a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: {str(existing)!r} is not a writable folder")


def check_corpus(spec: str, min_bytes: int) -> None:
    """``--data`` names readable text with more than ``min_bytes`` bytes in all (without reading it whole)."""
    if spec == SYNTHETIC:
        return
    path = resolve_corpus_path(spec)
    files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
    total = 0
    for file in files:
        try:
            with open(file, "rb") as f:
                total += len(f.read(min_bytes + 1 - total))
        except OSError:
            continue
        if total > min_bytes:
            return
    what = "holds no readable bytes" if total == 0 else f"holds {total} readable bytes, fewer than one sequence needs"
    raise ValueError(f"--data {spec!r}: the corpus {what} ({min_bytes + 1})")


def check_devices(run: RunConfig, device: torch.device) -> None:
    """Flags that would do nothing (or crawl) on this device are refused."""
    if run.network is not None and device.type != "cuda":
        raise ValueError(f"--network {run.network} sets NCCL variables; this run uses gloo on CPU, where it would "
                         "change nothing (leave it out)")
    if run.dtype == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise ValueError("--dtype bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); autocast would emulate it "
                         "many times slower than fp32: use --dtype fp32")


def cpu_has_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None) or torch.backends.cpu.get_cpu_capability() == "NONE"


def check_plan(path: str | None, identity: RunIdentity, variant: str) -> None:
    """The plan file is a lancet plan for this run and has ``variant``."""
    if path is None:
        return
    from lancet.plan.plan import load_plan

    plan = load_plan(path, identity)
    if variant not in plan.variants:
        raise ArtifactError(f"plan {path} has no variant {variant!r} (it has {', '.join(plan.variants)})")


def check_resume(run: RunConfig, world_size: int) -> None:
    """With ``--resume``, the latest complete checkpoint (if any) belongs to this run and is not past its end."""
    if not run.resume:
        return
    latest = latest_checkpoint(run.checkpoint_dir)
    if latest is None:
        return
    step, folder = latest
    check_manifest(read_manifest(folder), checkpoint_identity(run, world_size), folder)
    if step >= run.steps:
        raise CheckpointError(f"the latest checkpoint ({folder}) is at step {step}, not before --steps {run.steps}: "
                              "nothing to resume; raise --steps to train further")


def check_run(run: RunConfig, world_size: int, *, devices: bool = True) -> None:
    """Everything about a rank job's input that can be checked before launch (see the module docstring).

    ``devices=False`` leaves out what depends on this machine's devices (a run prepared here to run elsewhere).
    """
    cfg = run.validate(world_size)
    device = launcher_device()
    if devices:
        check_devices(run, device)
    if cfg is not None:  # a --model factory makes its own batches
        check_corpus(run.data, cfg.seq_len + 1)
    check_output_file(run.metrics_jsonl, "--metrics-jsonl")
    check_output_dir(run.checkpoint_dir, "--checkpoint-dir")
    if run.plan is not None and not Path(run.plan).exists():
        raise FileNotFoundError(f"plan file {run.plan!r} does not exist")
    check_plan(run.plan, run.identity(world_size, device), run.plan_variant)
    check_resume(run, world_size)
    inductor_options()  # a bad LANCET_INDUCTOR_OPTIONS fails here, not in every rank's first compile
    inline_from_environment()  # and a bad LANCET_INLINE_COLLECTIVES
