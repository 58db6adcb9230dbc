"""Run configuration shared by the commands that start ranks (train, bench, profile, inspect).

Everything a user can get wrong is checked here, in the launching process,
before any rank starts work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lancet.plan.artifact import RunIdentity, device_description, gate_description
from lancet.app.data import SYNTHETIC, resolve_corpus_path
from lancet.runtime.dist import NETWORK_ENV
from lancet.runtime.emulation import EmulationSpec
from lancet.models import GPT2MoEConfig, model_config
from lancet.moe import GATE_KINDS, GateConfig

DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """Which model, gate and expert count to build."""

    model: str = "cpu_small"
    gate: str = "switch"
    topk: int = 2
    capacity_factor: float = 1.0
    aux_loss_coef: float = 0.0
    num_experts: int | None = None
    """Total experts; None: 2 per rank."""
    vocab_size: int | None = None
    """Override the vocabulary (default 50257)."""

    def gate_config(self) -> GateConfig:
        if self.gate not in GATE_KINDS:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATE_KINDS)}")
        return GateConfig(
            kind=self.gate, topk=self.topk, capacity_factor=self.capacity_factor, aux_loss_coef=self.aux_loss_coef
        )

    def model_config(self) -> GPT2MoEConfig:
        overrides: dict = {"gate": self.gate_config(), "num_experts": self.num_experts}
        if self.vocab_size is not None:
            overrides["vocab_size"] = self.vocab_size
        return model_config(self.model, **overrides)


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
    network: str | None = None
    metrics_jsonl: str | None = None
    nproc: int | None = None
    gc_every: int = 10
    """Python garbage collection runs every this many steps, outside the timed step (never inside one)."""
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

    def validate(self, world_size: int) -> GPT2MoEConfig:
        """Raise ValueError/FileNotFoundError for bad input; return the model config."""
        cfg = self.spec.model_config()
        cfg.validate_for(world_size)
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
            if cfg.vocab_size < 256:
                raise ValueError(f"byte-level data needs a vocabulary of at least 256, got {cfg.vocab_size}")
        return cfg

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self, world_size: int, device) -> RunIdentity:
        """What artifacts made for this run must match."""
        import torch

        cfg = self.spec.model_config()
        emulation = self.emulation()
        network = self.network if self.network not in (None, "nvlink") else "native"
        return RunIdentity(
            model=cfg.name,
            gate=gate_description(self.spec.gate, self.spec.topk, self.spec.capacity_factor),
            world_size=world_size,
            dtype=self.dtype,
            device=device_description(device),
            network=emulation.network if emulation is not None else network,
            torch_version=torch.__version__.split("+")[0],
        )
