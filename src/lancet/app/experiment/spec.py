"""The experiment file: one JSON object per line, each naming one measurement.

A line names a model, a gate, a regime (network or emulation), the bench variants, and the
options of the passes; every field but ``model`` and ``variants`` is optional and left to the
command's default when absent. Blank lines and lines starting with ``#`` are skipped. A line
``{"defaults": {...}}`` sets fields for every later line (a line's own value wins; the
``*args`` and ``env`` mappings are merged key by key).

The Lancet paper's field names are accepted as aliases: ``name`` (model), ``moe_gate_type``
(gate), ``max_partition`` (max_partitions), ``no_dw_scheduling`` (no_dw), ``partition_type``
(``"none"``: no_partition; ``"dp"``: the default search) and ``framework`` (the variants of that
system: lancet, raf, deepspeed, tutel).

Options the driver does not name pass through to the commands: ``args`` to every command that
builds the model (profile and bench), ``profile_args``, ``comm_args``, ``optimize_args`` and
``bench_args`` to one command each; a mapping ``{"option": value}`` (``true``: the bare flag,
``false``: left out, a list: several values) or a list of command-line words.

Contract: ``load_experiments`` checks the type of every field and the uniqueness of line ids and
raises ``ExperimentError`` naming the file, the line number and the field; whether values suit
the commands is checked afterwards by parsing each step's command line (``preflight``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
PASS_THROUGH = ("args", "profile_args", "comm_args", "optimize_args", "bench_args")

FRAMEWORK_VARIANTS = {
    "lancet": ("lancet",),
    "raf": ("captured",),  # the paper's unoptimized graph baseline
    "deepspeed": ("eager",),  # eager expert parallelism, no overlap
    "tutel": ("tutel-d1", "tutel-d2", "tutel-d4", "tutel-d8"),  # the paper's overlap degrees
}
"""Variants that stand for each ``framework`` of the paper's experiment files."""

ALIASES = {
    "name": "model",
    "moe_gate_type": "gate",
    "max_partition": "max_partitions",
    "no_dw_scheduling": "no_dw",
    "partition_type": "no_partition",
    "framework": "variants",
}

_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": _STR, "model": (str, dict), "gate": _STR, "topk": _INT, "capacity_factor": _NUM,
    "aux_loss_coef": _NUM, "num_experts": _INT, "vocab_size": _INT, "dtype": _STR, "dispatch": _STR,
    "executor": _STR, "network": _STR, "emulate": _STR, "nproc": _INT, "profile_in_regime": _BOOL,
    "variants": (list, str), "max_partitions": _INT, "no_dw": _BOOL, "no_partition": _BOOL, "memory_cap": _INT,
    "predict": _BOOL, "steps": _INT, "warmup": _INT, "rounds": _INT, "profile_steps": _INT, "passes": _INT,
    "reps": _INT, "env": (dict,), "note": _STR, **{name: (dict, list) for name in PASS_THROUGH},
}
"""Every field a line may hold (after aliases) and the JSON types it accepts."""

MODEL_DIMS = ("num_layers", "d_model", "num_heads", "seq_len", "batch_size")


class ExperimentError(ValueError):
    """A line of an experiment file is wrong; the message names the file, the line and the field."""

    def __init__(self, source: str, number: int | None, field_name: str | None, message: str):
        where = f"{source}:{number}" if number is not None else source
        what = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{what} {message}")
        self.number, self.field = number, field_name


@dataclass(kw_only=True, slots=True, frozen=True)
class ExperimentLine:
    """One line of an experiment file, aliases resolved, types checked. None: the command's default."""

    number: int
    """Line number in the file (1-based)."""
    id: str
    """Folder name of the line's results; derived from model, gate, regime and options unless given."""
    model: str
    variants: tuple[str, ...]
    gate: str | None = None
    topk: int | None = None
    capacity_factor: float | None = None
    aux_loss_coef: float | None = None
    num_experts: int | None = None
    vocab_size: int | None = None
    dtype: str | None = None
    dispatch: str | None = None
    executor: str | None = None
    network: str | None = None
    emulate: str | None = None
    """``W:REGIME``: one GPU emulating a W-rank job over a network regime."""
    nproc: int | None = None
    profile_in_regime: bool = False
    """Profile under the line's network regime (collectives timed there price the plan); else natively."""
    max_partitions: int | None = None
    no_dw: bool = False
    no_partition: bool = False
    memory_cap: int | None = None
    predict: bool = False
    """Make a plan even when no lancet variant needs one, so eager/captured rows carry predictions."""
    steps: int | None = None
    warmup: int | None = None
    rounds: int | None = None
    profile_steps: int | None = None
    passes: int | None = None
    reps: int | None = None
    """Timed repetitions in profile and profile-comm."""
    args: Any = None
    profile_args: Any = None
    comm_args: Any = None
    optimize_args: Any = None
    bench_args: Any = None
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables set for every step of the line."""
    note: str | None = None
    framework: str | None = None
    """The paper's framework name when the line gave one (its variants are in ``variants``)."""

    @property
    def regime(self) -> str:
        """Network regime or emulation the line runs under, as a label."""
        if self.emulate:
            return f"emulate {self.emulate}"
        return self.network or "native"

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def load_experiments(path: str | Path) -> list[ExperimentLine]:
    """Parse and check every line of ``path``; raise ExperimentError on the first bad one."""
    path = Path(path)
    if not path.exists():
        raise ExperimentError(str(path), None, None, "experiment file does not exist")
    return parse_experiments(path.read_text(), str(path))


def parse_experiments(text: str, source: str = "<experiments>") -> list[ExperimentLine]:
    lines, defaults = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ExperimentError(source, number, None, f"not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(data, dict):
            raise ExperimentError(source, number, None, "a line must be a JSON object")
        if set(data) == {"defaults"}:
            defaults = _merge(defaults, _canonical(data["defaults"], source, number))
            continue
        lines.append(_line(_merge(defaults, _canonical(data, source, number)), source, number))
    if not lines:
        raise ExperimentError(source, None, None, "no experiment lines")
    _check_unique_ids(lines, source)
    return lines


def _canonical(data: Any, source: str, number: int) -> dict:
    """Aliases resolved to our names, unknown fields and wrong types refused."""
    if not isinstance(data, dict):
        raise ExperimentError(source, number, "defaults", "must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name not in FIELD_TYPES:
            known = ", ".join(sorted(FIELD_TYPES))
            raise ExperimentError(source, number, key, f"unknown field; known fields: {known} (and the paper's "
                                                       f"{', '.join(ALIASES)})")
        if name in out:
            raise ExperimentError(source, number, key, f"given twice (as {name!r} and its alias)")
        out[name] = _alias_value(key, value, source, number)
        if key == "framework":
            out["framework"] = value
    return out


def _alias_value(key: str, value: Any, source: str, number: int) -> Any:
    if key == "framework":
        if value not in FRAMEWORK_VARIANTS:
            raise ExperimentError(source, number, key, f"{value!r} has no counterpart here; choose one of "
                                                       f"{', '.join(FRAMEWORK_VARIANTS)}")
        return list(FRAMEWORK_VARIANTS[value])
    if key == "partition_type":
        if value not in ("dp", "none"):
            raise ExperimentError(source, number, key, f"{value!r} is not supported; 'dp' (range search) or 'none'")
        return value == "none"
    return value


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    if "variants" in update and "framework" not in update:
        merged.pop("framework", None)  # the line's own variants replace a default framework's
    for key, value in update.items():
        if key in (*PASS_THROUGH, "env") and isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


def _line(data: dict, source: str, number: int) -> ExperimentLine:
    for name, value in data.items():
        if name == "framework":
            continue
        types = FIELD_TYPES[name]
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ExperimentError(source, number, name, f"expected {wanted}, got {json.dumps(value)}")
    if "model" not in data:
        raise ExperimentError(source, number, "model", "missing (the model name, or 'name' as in the paper's files)")
    if "variants" not in data:
        raise ExperimentError(source, number, "variants", "missing (a list of bench variants, or 'framework')")
    fields = dict(data)
    fields["model"] = _model_name(data["model"], source, number)
    fields["variants"] = _variants(data["variants"], source, number)
    fields["env"] = _env(data.get("env") or {}, source, number)
    if data.get("network") and data.get("emulate"):
        raise ExperimentError(source, number, "emulate", "give either 'network' or 'emulate', not both")
    if data.get("emulate") is not None:
        _check_emulate(data["emulate"], source, number)
    for name in PASS_THROUGH:
        if name in data:
            _check_pass_through(name, data[name], source, number)
    fields.setdefault("id", _derived_id(fields))
    if not ID_RE.match(fields["id"]):
        raise ExperimentError(source, number, "id", f"{fields['id']!r}: use letters, digits, '.', '_' and '-' only")
    return ExperimentLine(number=number, **fields)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}


def _model_name(model: str | dict, source: str, number: int) -> str:
    """A model name, or the name of the GPT-2 MoE with the dimensions a mapping gives."""
    if isinstance(model, str):
        return model
    missing = [k for k in MODEL_DIMS if k not in model]
    extra = [k for k in model if k not in MODEL_DIMS]
    if missing or extra or not all(isinstance(model[k], int) and not isinstance(model[k], bool) for k in MODEL_DIMS):
        raise ExperimentError(source, number, "model", f"a model mapping holds the integers {', '.join(MODEL_DIMS)}")
    return "gpt2_moe_nl{num_layers}_m{d_model}_nh{num_heads}_sl{seq_len}_b{batch_size}".format(**model)


def _variants(value: list | str, source: str, number: int) -> tuple[str, ...]:
    variants = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not variants or not all(isinstance(v, str) and v for v in variants):
        raise ExperimentError(source, number, "variants", "a non-empty list of variant names")
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:
        raise ExperimentError(source, number, "variants", f"{', '.join(repeated)} given more than once")
    return tuple(variants)


def _env(env: dict, source: str, number: int) -> dict[str, str]:
    if not all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items()):
        raise ExperimentError(source, number, "env", "maps variable names to strings or numbers")
    return {k: str(v) for k, v in env.items()}


def _check_emulate(value: str, source: str, number: int) -> None:
    world, _, regime = value.partition(":")
    if not (world.isdigit() and int(world) >= 1 and regime):
        raise ExperimentError(source, number, "emulate", f"{value!r}: expected W:REGIME, e.g. '8:ib100'")


def _check_pass_through(name: str, value: dict | list, source: str, number: int) -> None:
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ExperimentError(source, number, name, "a list of command-line words must hold strings only")
        return
    for key, item in value.items():
        if not isinstance(item, (str, int, float, bool, list)) and item is not None:
            raise ExperimentError(source, number, name, f"option {key!r}: a string, number, boolean or list")


def _id_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _derived_id(fields: dict) -> str:
    parts = [_id_safe(fields["model"]), fields.get("gate")]  # hf:NAME, pkg.mod:factory
    if fields.get("emulate"):
        world, _, regime = fields["emulate"].partition(":")
        parts.append(f"emu{world}-{_id_safe(Path(regime).stem)}")
    else:
        parts.append(fields.get("network"))
    parts += [fields.get("framework"), fields.get("dispatch"), fields.get("executor")]
    parts += ["nodw" if fields.get("no_dw") else None, "nopart" if fields.get("no_partition") else None]
    if fields.get("max_partitions") is not None:
        parts.append(f"maxp{fields['max_partitions']}")
    return "_".join(str(p) for p in parts if p)


def _check_unique_ids(lines: list[ExperimentLine], source: str) -> None:
    first: dict[str, int] = {}
    for line in lines:
        if line.id in first:
            raise ExperimentError(
                source, line.number, "id",
                f"{line.id!r} is also the id of line {first[line.id]}; give one of them an 'id' of its own",
            )
        first[line.id] = line.number
