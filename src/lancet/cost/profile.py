"""Measure the cost of every compute node of a captured step graph on the real device.

The graph runs through an interpreter on real batches. Each compute node that
launches work is re-run ``reps`` times back to back on its real inputs and
timed (CUDA events on the GPU, the host clock on the CPU), after ``warmup``
untimed runs; nodes with the same op, shapes and dtypes are measured once per
pass. Several passes over different batches give a median per node. Every rank
measures and the ranks agree on one table (median across ranks), so every rank
later derives the same plan.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import fx

from lancet.cost.clock import Clock
from lancet.graph.roles import Role, collective_kind, is_view, node_role
from lancet.graph.shapes import output_bytes


def graph_fingerprint(graph: fx.Graph) -> str:
    """Hash of the graph's structure (node names, targets and inputs), independent of rank and device index."""
    digest = hashlib.sha256()
    for node in graph.nodes:
        inputs = ",".join(p.name for p in node.all_input_nodes)
        digest.update(f"{node.op}|{node.name}|{node.target}|{inputs}\n".encode())
    return digest.hexdigest()[:16]


def _arg_spec(value) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_arg_spec(v) for v in value) + "]"
    return repr(value)


def op_key(node: fx.Node, args: tuple, kwargs: dict) -> str:
    """``op(arg specs)``: the op with the shapes and dtypes of its tensor arguments."""
    parts = [_arg_spec(a) for a in args] + [f"{k}={_arg_spec(v)}" for k, v in sorted(kwargs.items())]
    return f"{node.target}({', '.join(parts)})"


def is_timed(node: fx.Node) -> bool:
    """Nodes whose cost the profile measures: compute and host syncs that launch work (not views or asserts)."""
    return node_role(node) in (Role.COMPUTE, Role.HOST_SYNC) and not is_view(node) and "assert" not in str(node.target)


class NodeTimer(fx.Interpreter):
    """Executes a graph once, timing every compute node on its real inputs."""

    def __init__(self, gm: fx.GraphModule, device: torch.device, reps: int, warmup: int) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.clock = Clock(device)
        self.reps = reps
        self.warmup = warmup
        self.node_ms: dict[str, float] = {}
        self.host_ms: dict[str, float] = {}
        self.node_key: dict[str, str] = {}
        self.out_bytes: dict[str, int] = {}
        self._by_key: dict[str, tuple[float, float]] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        self.out_bytes[node.name] = output_bytes(result)
        if node.op != "call_function" or node_role(node) in (Role.COMM_START, Role.COMM_WAIT):
            return result
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        call = lambda: node.target(*args, **kwargs)  # noqa: E731
        if not is_timed(node):
            self.host_ms[node.name] = self.clock.host_ms(call, self.reps)
            return result
        key = op_key(node, args, kwargs)
        if key not in self._by_key:
            for _ in range(self.warmup):
                call()
            self._by_key[key] = self.clock.time_ms(call, self.reps, queue_ahead=True)
        self.node_ms[node.name], self.host_ms[node.name] = self._by_key[key]
        self.node_key[node.name] = key
        return result


@dataclass(slots=True)
class RankCosts:
    """One rank's medians over passes: device ms and host ms per node, bytes of each collective it started."""

    node_ms: dict[str, float] = field(default_factory=dict)
    host_ms: dict[str, float] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"node_ms": self.node_ms, "host_ms": self.host_ms, "comm_bytes": self.comm_bytes}

    @classmethod
    def from_json(cls, data: dict) -> RankCosts:
        return cls(
            node_ms={n: float(v) for n, v in data["node_ms"].items()},
            host_ms={n: float(v) for n, v in data["host_ms"].items()},
            comm_bytes={n: int(v) for n, v in data["comm_bytes"].items()},
        )


@dataclass(slots=True)
class ComputeProfile:
    """Median cost per node (ms) and bytes per node of one graph, agreed across ranks."""

    fingerprint: str
    node_ms: dict[str, float] = field(default_factory=dict)
    host_ms: dict[str, float] = field(default_factory=dict)
    """Host time to issue each node (launch overhead; includes any wait of a host sync)."""
    node_key: dict[str, str] = field(default_factory=dict)
    out_bytes: dict[str, int] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    """Collective start node -> bytes it produced on this rank (median over passes and ranks)."""
    comm_kind: dict[str, str] = field(default_factory=dict)
    passes: int = 0
    ranks: list[RankCosts] = field(default_factory=list)
    """Each rank's own medians over passes (rank order); empty for single-process profiles."""
    optimizer_ms: float = 0.0
    """The optimizer update that follows the step graph (slowest rank)."""

    def op_ms(self) -> dict[str, float]:
        table: dict[str, list[float]] = {}
        for name, key in self.node_key.items():
            table.setdefault(key, []).append(self.node_ms[name])
        return {k: statistics.median(v) for k, v in table.items()}

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "passes": self.passes,
            "nodes": {n: {"ms": ms, "key": self.node_key.get(n, "")} for n, ms in self.node_ms.items()},
            "host_ms": self.host_ms,
            "ops": self.op_ms(),
            "out_bytes": self.out_bytes,
            "collectives": {n: {"kind": self.comm_kind[n], "bytes": b} for n, b in self.comm_bytes.items()},
            "ranks": [r.to_json() for r in self.ranks],
            "optimizer_ms": self.optimizer_ms,
        }

    @classmethod
    def from_json(cls, data: dict) -> ComputeProfile:
        return cls(
            fingerprint=data["fingerprint"],
            node_ms={n: v["ms"] for n, v in data["nodes"].items()},
            node_key={n: v["key"] for n, v in data["nodes"].items()},
            host_ms={n: float(v) for n, v in data.get("host_ms", {}).items()},
            out_bytes={n: int(b) for n, b in data["out_bytes"].items()},
            comm_bytes={n: int(v["bytes"]) for n, v in data["collectives"].items()},
            comm_kind={n: v["kind"] for n, v in data["collectives"].items()},
            passes=data.get("passes", 0),
            ranks=[RankCosts.from_json(r) for r in data.get("ranks", [])],
            optimizer_ms=float(data.get("optimizer_ms", 0.0)),
        )


def _median_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*dicts)
    return {k: statistics.median(d[k] for d in dicts if k in d) for k in sorted(keys)}


def profile_graph(
    gm: fx.GraphModule,
    batches: list[list[torch.Tensor]],
    device: torch.device,
    group: dist.ProcessGroup | None,
    *,
    reps: int = 5,
    warmup: int = 2,
    progress: Callable[[int], None] | None = None,
) -> ComputeProfile:
    """Time every compute node over one pass per batch; median over passes, then over ranks."""
    per_pass_ms, per_pass_host, per_pass_bytes = [], [], []
    keys: dict[str, str] = {}
    for i, inputs in enumerate(batches):
        timer = NodeTimer(gm, device, reps=reps, warmup=warmup)
        with torch.no_grad():
            timer.run(*inputs)
        per_pass_ms.append(timer.node_ms)
        per_pass_host.append(timer.host_ms)
        per_pass_bytes.append({k: float(v) for k, v in timer.out_bytes.items()})
        keys.update(timer.node_key)
        if progress is not None:
            progress(i + 1)
    node_ms, out_bytes = _median_dicts(per_pass_ms), _median_dicts(per_pass_bytes)
    host_ms = _median_dicts(per_pass_host)
    starts = [n for n in gm.graph.nodes if node_role(n) == Role.COMM_START]
    ranks: list[RankCosts] = []
    if group is not None and dist.get_world_size(group) > 1:
        gathered: list[object] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (node_ms, out_bytes, host_ms), group=group)
        ranks = [
            RankCosts(g[0], g[2], {n.name: int(g[1].get(n.name, 0)) for n in starts}) for g in gathered
        ]
        node_ms = _median_dicts([g[0] for g in gathered])
        out_bytes = _median_dicts([g[1] for g in gathered])
        host_ms = _median_dicts([g[2] for g in gathered])
    return ComputeProfile(
        fingerprint=graph_fingerprint(gm.graph),
        node_ms=node_ms,
        host_ms=host_ms,
        node_key={n: keys[n] for n in node_ms},
        out_bytes={n: int(b) for n, b in out_bytes.items()},
        comm_bytes={n.name: int(out_bytes.get(n.name, 0)) for n in starts},
        comm_kind={n.name: collective_kind(n) for n in starts},
        passes=len(batches),
        ranks=ranks,
    )
