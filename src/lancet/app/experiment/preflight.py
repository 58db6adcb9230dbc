"""Check a step's command line the way the command itself would, without running it.

The line is parsed with lancet's own argument parser, so options added to a command later are
accepted without the driver knowing them, and unknown options or bad values are refused before
anything runs. Commands that start ranks also get the run checks they make before launching
(model name, experts per rank, sequence length, data path; not the device checks, since a file
prepared here may run on another machine); bench variant names are checked
against the variants bench knows. Checks a command makes only once it runs (``--passes 0``)
surface when the step runs.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from lancet.app.experiment.steps import Step, StepArgError

RUN_COMMANDS = ("profile", "profile-comm", "bench")
_FLAG_RE = re.compile(r"(--[A-Za-z0-9][\w-]*)")


def check_step(step: Step) -> None:
    """Raise StepArgError (naming the line field) when ``step``'s command line would be refused."""
    argv = step.argv(Path("/nonexistent-experiment-out"))
    args = _parse(argv, step)
    if step.kind in RUN_COMMANDS:
        _check_run(args, step)
    if step.kind == "bench":
        _check_variants(args.variants.split(","))


def _parse(argv: list[str], step: Step):
    from lancet.app.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args, unknown = build_parser().parse_known_args(argv)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "refused"
        raise StepArgError(_field_of(message, step), message) from None
    if unknown:
        flag = next((w for w in unknown if w.startswith("-")), unknown[0])
        raise StepArgError(_field_of(flag, step), f"`lancet {step.kind}` has no option {flag}")
    return args


def _check_run(args, step: Step) -> None:
    from lancet.app.cli import UsageError, checked, run_config

    try:
        checked(run_config(args), devices=False)  # the file may be meant for another machine's devices
    except UsageError as err:
        raise StepArgError(_field_of(str(err), step), f"`lancet {step.kind}`: {err}") from None


def _check_variants(variants: list[str]) -> None:
    from lancet.app.bench import is_known_variant

    unknown = [v for v in variants if not is_known_variant(v)]
    if unknown:
        raise StepArgError("variants", f"unknown bench variant(s) {', '.join(unknown)}")


def _field_of(message: str, step: Step) -> str:
    """The line field behind the first flag the message names (or the model fields when it names none)."""
    for flag in _FLAG_RE.findall(message):
        for known, field_name in step.origins.items():
            if known == flag or known.startswith(flag):
                return field_name
    words = set(re.findall(r"[a-z_]+", message.lower()))
    fields = list(dict.fromkeys(step.origins.values()))
    named = [f for f in fields if f in words] or [f for f in fields if any(
        len(part) > 4 and part in words for part in f.split("_"))]
    return named[0] if named else "model"
