"""From experiment lines to lancet command lines: profile, profile-comm, optimize, bench.

A step is one ``lancet`` command with the files it writes. Its key is a hash of its command line
(paths inside the output folder written relative to it) and its environment, so two lines that
need the same measurement name the same step, and it runs once; a line whose options change gets
new steps. Shared steps live under ``steps/<kind>/``, a line's bench under ``lines/<id>/``.

Which commands a named field reaches:

| field | profile | profile-comm | optimize | bench |
|---|---|---|---|---|
| model, gate, topk, capacity_factor, aux_loss_coef, num_experts, vocab_size, dtype, dispatch, executor | yes | | | yes |
| nproc, emulate | yes | yes | | yes |
| network | with profile_in_regime | yes | | yes |
| passes | yes | | | |
| reps | yes | yes | | |
| max_partitions, no_dw, no_partition, memory_cap | | | yes | |
| variants, steps, warmup, rounds, profile_steps | | | | yes |

A plan (profile, profile-comm, optimize) is made when a variant starts with ``lancet`` or the line
asks for predictions.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lancet.app.experiment.spec import ExperimentError, ExperimentLine

HF_PREFIX = "hf:"
"""A line's ``model`` ``hf:NAME_OR_DIR`` runs a HuggingFace config (``--hf-config``), e.g. ``hf:qwen3-moe-h200``."""
MODEL_FIELDS = ("model", "gate", "topk", "capacity_factor", "aux_loss_coef", "num_experts", "vocab_size", "dtype",
                "dispatch", "executor")
OWN_FIELDS = {
    "profile": ("passes", "reps"),
    "profile-comm": ("reps",),
    "optimize": ("max_partitions", "no_dw", "no_partition", "memory_cap"),
    "bench": ("steps", "warmup", "rounds", "profile_steps"),
}
DRIVER_FLAGS = {
    "profile": ("--out",),
    "profile-comm": ("--out",),
    "optimize": ("--profile", "--comm", "--out", "--trace-dir"),
    "bench": ("--variants", "--plan", "--json", "--trace-dir"),
}
"""Flags the driver sets itself; a line may not pass them through."""
PASS_THROUGH_OF = {"profile": ("args", "profile_args"), "profile-comm": ("comm_args",),
                   "optimize": ("optimize_args",), "bench": ("args", "bench_args")}
OUTPUT_FLAGS = {
    "profile": {"--out": "profile.json"},
    "profile-comm": {"--out": "comm.json"},
    "optimize": {"--out": "plan.json", "--trace-dir": "pred"},
    "bench": {"--json": "bench.json", "--trace-dir": "traces"},
}
"""Where each command writes, inside its step's folder; the first file is the step's result."""


class StepArgError(ValueError):
    """A line's options do not make a valid command line; names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True, slots=True)
class OutPath:
    """A path inside the experiment's output folder (the folder may move between runs)."""

    rel: str

    def __str__(self) -> str:
        return f"<out>/{self.rel}"


@dataclass(slots=True)
class Step:
    """One lancet command and the folder its outputs go to (relative to the output folder)."""

    kind: str
    template: list[str | OutPath]
    folder: str
    env: dict[str, str]
    deps: list[Step] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)
    """Flag -> the line field it came from (for error messages)."""
    lines: list[int] = field(default_factory=list)
    """Numbers of the lines that need this step."""
    variants: int = 0
    model: str = ""

    @property
    def key(self) -> str:
        text = json.dumps([self.kind, [str(t) for t in self.template], sorted(self.env.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def output(self) -> str:
        """The step's result file, relative to the output folder."""
        return f"{self.folder}/{next(iter(OUTPUT_FLAGS[self.kind].values()))}"

    def full_template(self) -> list[str | OutPath]:
        """The command line with the step's own output flags (which do not enter the key)."""
        words = list(self.template)
        for flag, name in OUTPUT_FLAGS[self.kind].items():
            words += [flag, OutPath(f"{self.folder}/{name}")]
        return words

    def argv(self, out: Path) -> list[str]:
        """The command line with paths inside ``out`` made absolute (without ``python -m lancet``)."""
        return [str(out / t.rel) if isinstance(t, OutPath) else t for t in self.full_template()]

    def display(self) -> str:
        return "lancet " + " ".join(str(t) for t in self.full_template())


@dataclass(slots=True)
class LineSteps:
    line: ExperimentLine
    bench: Step
    plan: Step | None = None

    def chain(self) -> list[Step]:
        """Every step of the line in the order they run (dependencies first)."""
        ordered: list[Step] = []
        for step in (*(self.plan.deps if self.plan else ()), self.plan, self.bench):
            if step is not None and step not in ordered:
                ordered.append(step)
        return ordered


def needs_plan(line: ExperimentLine) -> bool:
    """A line needs profile, comm curves and a plan when a variant is a plan's (``lancet*``) or it asks for predictions."""
    return line.predict or any(v.startswith("lancet") for v in line.variants)


def build_steps(lines: list[ExperimentLine], source: str = "<experiments>") -> list[LineSteps]:
    """Steps of every line; equal profile, comm and plan steps are one object shared by the lines.

    Raises ExperimentError (naming line and field) when a pass-through option collides with a named
    field or with a flag the driver sets.
    """
    shared: dict[str, Step] = {}

    def one(step: Step, line: ExperimentLine) -> Step:
        step = shared.setdefault(step.folder, step)
        step.lines.append(line.number)
        return step

    result = []
    for line in lines:
        try:
            plan = None
            if needs_plan(line):
                profile = one(_profile_step(line), line)
                comm = one(_comm_step(line), line)
                plan = one(_optimize_step(line, profile, comm), line)
            bench = _bench_step(line, plan)
        except StepArgError as err:
            raise ExperimentError(source, line.number, err.field, str(err)) from None
        bench.lines.append(line.number)
        result.append(LineSteps(line, bench, plan))
    return result


def _profile_step(line: ExperimentLine) -> Step:
    words = _Words(line)
    words.named(*MODEL_FIELDS, "nproc", "emulate")
    if line.profile_in_regime:
        words.named("network")
    words.named(*OWN_FIELDS["profile"])
    return words.finish("profile", _slug(line.model, line.gate))


def _comm_step(line: ExperimentLine) -> Step:
    words = _Words(line)
    words.named("nproc", "emulate", "network", *OWN_FIELDS["profile-comm"])
    return words.finish("profile-comm", _slug(line.regime))


def _optimize_step(line: ExperimentLine, profile: Step, comm: Step) -> Step:
    words = _Words(line)
    words.named(*OWN_FIELDS["optimize"])
    step = words.finish("optimize", _slug(line.model, line.regime), inputs={
        "--profile": OutPath(profile.output), "--comm": OutPath(comm.output)})
    step.deps = [profile, comm]
    return step


def _bench_step(line: ExperimentLine, plan: Step | None) -> Step:
    words = _Words(line)
    words.named(*MODEL_FIELDS, "nproc", "emulate", "network", *OWN_FIELDS["bench"])
    folder = f"lines/{line.id}"
    words.words += ["--variants", ",".join(line.variants)]
    words.origins["--variants"] = "variants"
    inputs = {"--plan": OutPath(plan.output)} if plan is not None else {}
    step = words.finish("bench", line.id, inputs=inputs, folder=folder)
    step.deps = [plan] if plan else []
    step.variants = len(line.variants)
    return step


class _Words:
    """Builds one command line from a line's named fields and pass-through options."""

    def __init__(self, line: ExperimentLine):
        self.line = line
        self.words: list[str | OutPath] = []
        self.origins: dict[str, str] = {}

    def named(self, *names: str) -> None:
        for name in names:
            value = getattr(self.line, name)
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            if name == "model" and value.startswith(HF_PREFIX):  # a HuggingFace config: known name or directory
                flag, value = "--hf-config", value.removeprefix(HF_PREFIX)
            self.words += [flag] if value is True else [flag, _word(value)]
            self.origins[flag] = name

    def finish(self, kind: str, slug: str, inputs: dict[str, OutPath] | None = None, folder: str | None = None) -> Step:
        for name in PASS_THROUGH_OF[kind]:
            value = getattr(self.line, name)
            if value is not None:
                self._pass_through(kind, name, value)
        template: list[str | OutPath] = [kind, *self.words]
        for flag, path in (inputs or {}).items():
            template += [flag, path]
        step = Step(kind, template, folder or "", dict(self.line.env), origins=self.origins, model=self.line.model)
        step.folder = folder or f"steps/{kind}/{slug}-{step.key}"
        return step

    def _pass_through(self, kind: str, name: str, value: dict | list) -> None:
        words = list(value) if isinstance(value, list) else _option_words(value)
        for word in words:
            if not word.startswith("--"):
                continue
            flag = word.split("=", 1)[0]
            if flag in DRIVER_FLAGS[kind]:
                raise StepArgError(name, f"{flag} of `lancet {kind}` is set by the driver")
            if flag in self.origins:
                raise StepArgError(name, f"{flag} of `lancet {kind}` comes from the field {self.origins[flag]!r}; "
                                         "set it there")
            self.origins[flag] = name
        self.words += words


def _slug(*parts: str | None) -> str:
    """A folder-name-safe label of the parts (the step's key makes it unique)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", "-".join(p for p in parts if p)).strip("-")


def _option_words(options: dict) -> list[str]:
    words: list[str] = []
    for key, value in options.items():
        flag = "--" + key.lstrip("-").replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *(_word(v) for v in value)]
        elif value is not None and value is not False:
            words += [flag, _word(value)]
    return words


def _word(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)
