"""Run configuration shared by the commands that start ranks (train, bench, profile, inspect).

Everything a user can get wrong is checked here, in the launching process,
before any rank starts work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lancet.plan.artifact import RunIdentity, device_description, gate_description
from lancet.app.data import SYNTHETIC, resolve_corpus_path
from lancet.app.guard import NONFINITE_POLICIES
from lancet.runtime.dist import DEFAULT_COLLECTIVE_TIMEOUT_S, NETWORK_ENV
from lancet.runtime.emulation import EmulationSpec
from lancet.integrations.hf_models import HFModelConfig, hf_model_config
from lancet.models import GPT2MoEConfig, build_model, model_config
from lancet.models.factory import is_factory_reference, load_factory
from lancet.moe import DISPATCH_KINDS, GATE_KINDS, GateConfig

DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """Which model, gate and expert count to build."""

    model: str = "cpu_small"
    """A built-in config name, or ``package.module:factory`` (``lancet.models.factory``)."""
    gate: str = "switch"
    topk: int = 2
    capacity_factor: float = 1.0
    aux_loss_coef: float = 0.0
    num_experts: int | None = None
    """Total experts; None: 2 per rank."""
    vocab_size: int | None = None
    """Override the vocabulary (default 50257)."""
    dispatch: str | None = None
    """padded or ragged (None: padded for the capacity gates, ragged for topk)."""
    hf_config: str | None = None
    """A transformers MoE model (known name or local directory) instead of ``model``: ``hf_model_config``."""
    hf_capacity_factor: float | None = None
    """HF models: top-k with this capacity factor (None: dropless)."""
    batch_size: int | None = None
    """HF models: sequences per rank (None: the name's default)."""
    seq_len: int | None = None
    """HF models: tokens per sequence (None: the name's default)."""

    def gate_config(self) -> GateConfig:
        if self.gate not in GATE_KINDS:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATE_KINDS)}")
        if self.dispatch is not None and self.dispatch not in DISPATCH_KINDS:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; choose one of {', '.join(DISPATCH_KINDS)}")
        return GateConfig(
            kind=self.gate, topk=self.topk, capacity_factor=self.capacity_factor, aux_loss_coef=self.aux_loss_coef,
            dispatch=self.dispatch,
        )

    def model_config(self) -> GPT2MoEConfig | HFModelConfig:
        if self.hf_config is not None or self.batch_size is not None or self.seq_len is not None:
            return self.hf_model_config()
        overrides: dict = {"gate": self.gate_config(), "num_experts": self.num_experts}
        if self.vocab_size is not None:
            overrides["vocab_size"] = self.vocab_size
        return model_config(self.model, **overrides)

    def describe(self) -> str:
        """The model and its routing in a few words (table titles): ``NAME gate=GATE_DISPATCH``."""
        if is_factory_reference(self.model):
            return self.model
        cfg = self.model_config()
        return f"{cfg.name} gate={gate_description(cfg.gate)}"

    def hf_model_config(self) -> HFModelConfig:
        if self.hf_config is None:
            raise ValueError("--batch-size and --seq-len apply to --hf-config models (GPT-2 names carry their shape)")
        if self.dispatch == "padded":
            raise ValueError("HF models route top-k: the padded dispatch takes top-1 gates only; leave out --dispatch")
        if self.hf_capacity_factor is not None and self.hf_capacity_factor <= 0:
            raise ValueError(f"--hf-capacity-factor must be > 0, got {self.hf_capacity_factor}")
        return hf_model_config(self.hf_config, self.batch_size, self.seq_len, capacity_factor=self.hf_capacity_factor,
                               aux_loss_coef=self.aux_loss_coef)


def build_run_model(cfg: GPT2MoEConfig | HFModelConfig, group, device, seed: int = 0):
    """The model of one rank for a GPT-2 config or an HF model."""
    if isinstance(cfg, HFModelConfig):
        return cfg.build(group, device=device, seed=seed)
    return build_model(cfg, group, device=device, seed=seed)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """One run: model, data, precision, and how the step executes."""

    spec: ModelSpec = field(default_factory=ModelSpec)
    steps: int = 20
    optimizer: str = "adamw"
    lr: float | None = None
    dtype: str = "fp32"
    data: str = SYNTHETIC
    seed: int = 0
    mode: str = "eager"
    """eager: run the step function op by op; captured: run the traced whole-step graph."""
    plan: str | None = None
    """Plan file (from ``lancet optimize``) to apply to the captured graph."""
    plan_variant: str = "lancet"
    """Which variant of the plan to run (lancet, lancet-dw, lancet-part)."""
    executor: str | None = None
    """How the captured graph runs: interpret, compiled or cudagraph; None: the fastest the graph and device
    allow (``lancet.runtime.executor``)."""
    network: str | None = None
    metrics_jsonl: str | None = None
    nproc: int | None = None
    gc_every: int = 10
    """Python garbage collection runs every this many steps, outside the timed step (never inside one)."""
    checkpoint_dir: str | None = None
    """Folder of checkpoints (``lancet.app.checkpoint``); None: no checkpoints."""
    checkpoint_every: int = 100
    """Save after every this many steps (and after the last step, and on Ctrl-C)."""
    resume: bool = False
    """Start from the latest complete checkpoint in ``checkpoint_dir`` (from step 0 if there is none)."""
    nonfinite: str = "stop"
    """On a non-finite loss or gradient: stop (naming step and tensor) or skip the step's update."""
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    """Seconds a rank waits in one collective for its peers before giving up."""
    emulate: str | None = None
    """``W:REGIME``: run rank 0 of a W-rank job in one process, every collective a stand-in priced by REGIME
    (``lancet.runtime.emulation``)."""
    emulate_sms: int | None = None
    """SMs a GPU stand-in collective keeps busy for its whole transfer (None: the regime's, else 4)."""

    def emulation(self) -> EmulationSpec | None:
        """The emulated job (None for a real run); ValueError/FileNotFoundError for a bad spec or regime."""
        return None if self.emulate is None else EmulationSpec.parse(self.emulate, self.emulate_sms)

    @property
    def network_label(self) -> str:
        """How tables name the network: the regime, ``native``, or the emulated job."""
        if self.emulate is not None:
            world, _, regime = self.emulate.partition(":")
            return f"emulated {world} ranks on {regime} (one rank run, collectives are stand-ins)"
        return f"network={self.network or 'native'}"

    def validate(self, world_size: int) -> GPT2MoEConfig | HFModelConfig:
        """Raise ValueError/FileNotFoundError for bad input; return the model config."""
        if world_size < 1:
            raise ValueError(f"--nproc must be >= 1, got {world_size}")
        cfg = self._validate_model(world_size)
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.gc_every < 1:
            raise ValueError(f"--gc-every must be >= 1, got {self.gc_every}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.mode not in ("eager", "captured"):
            raise ValueError(f"unknown mode {self.mode!r}; choose eager or captured")
        if self.plan is not None and self.mode != "captured":
            raise ValueError("--plan applies to the captured graph; use --mode captured")
        self._validate_executor()
        if self.network is not None and self.network not in NETWORK_ENV:
            raise ValueError(f"unknown network regime {self.network!r}; choose one of {', '.join(NETWORK_ENV)}")
        emulation = self.emulation()
        if emulation is not None and self.network is not None:
            raise ValueError("--emulate models the network with its regime; leave --network out")
        if emulation is not None and self.nproc not in (None, 1):
            raise ValueError(f"--emulate runs one process (rank 0 of the emulated job); --nproc {self.nproc} given")
        if emulation is not None and emulation.world_size != world_size:
            raise ValueError(f"validated for {world_size} ranks, but --emulate asks for {emulation.world_size}")
        if self.data != SYNTHETIC:
            resolve_corpus_path(self.data)
            if cfg is not None and cfg.vocab_size < 256:
                raise ValueError(f"byte-level data needs a vocabulary of at least 256, got {cfg.vocab_size}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown --nonfinite {self.nonfinite!r}; choose one of {', '.join(NONFINITE_POLICIES)}")
        if self.collective_timeout <= 0:
            raise ValueError(f"--collective-timeout must be > 0 seconds, got {self.collective_timeout:g}")
        return cfg

    def _validate_model(self, world_size: int) -> GPT2MoEConfig | None:
        """The built-in model's config, checked for ``world_size``; None for a ``--model`` factory (which makes
        its own batches and holds its own experts)."""
        if is_factory_reference(self.spec.model):
            load_factory(self.spec.model)  # importable here, or a clear error before any rank starts
            if self.data != SYNTHETIC:
                raise ValueError(f"--model {self.spec.model} makes its own batches; leave out --data")
            if self.checkpoint_dir is not None:
                raise ValueError(f"--checkpoint-dir is not supported for a --model factory ({self.spec.model}) yet")
            if self.emulate is not None:
                raise ValueError(f"--emulate is not supported for a --model factory ({self.spec.model}) yet")
            return None
        cfg = self.spec.model_config()
        experts = cfg.total_experts(world_size)
        if experts < world_size:
            raise ValueError(f"{world_size} ranks but only {experts} experts: every rank needs at least one expert")
        cfg.validate_for(world_size)
        return cfg

    def settings(self) -> dict:
        """The settings that decide a run's numbers (what every rank must agree on; paths of outputs excluded)."""
        return {"spec": asdict(self.spec), "steps": self.steps, "optimizer": self.optimizer, "lr": self.learning_rate,
                "dtype": self.dtype, "data": self.data, "seed": self.seed, "mode": self.mode,
                "plan_variant": self.plan_variant if self.plan else None, "nonfinite": self.nonfinite,
                "checkpoint_every": self.checkpoint_every if self.checkpoint_dir else None, "resume": self.resume,
                "executor": self.executor}

    def _validate_executor(self) -> None:
        import torch

        from lancet.runtime.executor import EXECUTORS, check_executor_device

        if self.executor is None:
            return
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        if self.mode != "captured":
            raise ValueError(f"--executor {self.executor} runs the captured graph; leave out --mode eager")
        check_executor_device(self.executor, "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self, world_size: int, device) -> RunIdentity:
        """What artifacts made for this run must match."""
        import torch

        factory = is_factory_reference(self.spec.model)
        cfg = None if factory else self.spec.model_config()
        emulation = self.emulation()
        network = self.network if self.network not in (None, "nvlink") else "native"
        return RunIdentity(
            model=self.spec.model if factory else cfg.name,
            gate="" if factory else gate_description(cfg.gate),
            world_size=world_size,
            dtype=self.dtype,
            device=device_description(device),
            network=emulation.network if emulation is not None else network,
            torch_version=torch.__version__.split("+")[0],
        )


def plan_digest(path: str | None) -> str | None:
    """sha256 of a plan file's bytes (None without a plan)."""
    if path is None:
        return None
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_identity(run: RunConfig, world_size: int) -> dict:
    """What a checkpoint records of its run, and what resuming requires to be equal (JSON values)."""
    return {
        "spec": asdict(run.spec),
        "world_size": world_size,
        "dtype": run.dtype,
        "optimizer": run.optimizer,
        "lr": run.learning_rate,
        "seed": run.seed,
        "data": run.data,
        "plan": plan_digest(run.plan),
        "plan_variant": run.plan_variant if run.plan else None,
    }
