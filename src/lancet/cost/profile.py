"""Measure the cost of every compute node of a captured step graph on the real device.

The graph runs through an interpreter on real batches. Each compute node that
launches work is re-run ``reps`` times back to back on its real inputs and
timed (CUDA events on the GPU, the host clock on the CPU), after ``warmup``
untimed runs; nodes with the same op, shapes and dtypes are measured once per
pass. Collectives are timed on the real group with their real split sizes, and
each all-to-all's off-rank bytes are recorded. Several passes over different
batches give a median per node. Every rank measures and the ranks agree on one
table (median across ranks), so every rank later derives the same plan; each
rank's own medians are kept beside it (the simulator models rank skew with
them).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import fx

from lancet.cost.clock import Clock
from lancet.cost.executor import ExecutorProfile
from lancet.graph.ops import is_assert
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
    return node_role(node) in (Role.COMPUTE, Role.HOST_SYNC) and not is_view(node) and not is_assert(node)


class NodeTimer(fx.Interpreter):
    """Executes a graph once, timing every compute node on its real inputs.

    With a process group of several ranks, every collective is timed too: all
    ranks run the same graph, so they reach each collective in the same order;
    a barrier lines them up, then the collective (and its wait) runs ``reps``
    times on its real inputs.
    """

    def __init__(
        self, gm: fx.GraphModule, device: torch.device, reps: int, warmup: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.clock = Clock(device)
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.rank = dist.get_rank(group) if self.group is not None else 0
        self.world = dist.get_world_size(group) if self.group is not None else 1
        self.offrank: dict[str, tuple[int, int]] = {}
        self.comm_ms: dict[str, float] = {}
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
        if node_role(node) == Role.COMM_START:
            if collective_kind(node) == "all_to_all":
                self.offrank[node.name] = self._offrank_bytes(node)
            if self.group is not None:
                self.comm_ms[node.name] = self._collective_ms(node)
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

    def _collective_ms(self, node: fx.Node) -> float:
        """Device time of collective ``node`` and its wait, ranks lined up by a barrier first."""
        args, kwargs = self.fetch_args_kwargs_from_env(node)

        def call() -> None:
            out = node.target(*args, **kwargs)
            for tensor in out if isinstance(out, (list, tuple)) else [out]:
                torch.ops._c10d_functional.wait_tensor.default(tensor)

        for _ in range(self.warmup):
            call()
        dist.barrier(self.group)
        return self.clock.device_ms(call, self.reps)

    def _offrank_bytes(self, node: fx.Node) -> tuple[int, int]:
        """(bytes sent to other ranks, bytes received from them) by this rank in all-to-all ``node``."""
        args, _ = self.fetch_args_kwargs_from_env(node)
        tensor, output_splits, input_splits = args[0], args[1], args[2]
        rows = tensor.shape[0] if tensor.dim() else 1
        row_bytes = tensor.numel() * tensor.element_size() // max(rows, 1)

        def off(splits, total_rows: int) -> int:
            if not splits:
                return total_rows * (self.world - 1) // self.world * row_bytes
            splits = [int(s) for s in splits]
            return (sum(splits) - splits[self.rank]) * row_bytes

        received_rows = sum(int(s) for s in output_splits) if output_splits else rows
        return off(input_splits, rows), off(output_splits, received_rows)


def _pairs_to_json(pairs: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    return {n: list(v) for n, v in pairs.items()}


def _pairs_from_json(data: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {n: (float(v[0]), float(v[1])) for n, v in data.items()}


@dataclass(slots=True)
class RankCosts:
    """One rank's medians over passes: device ms and host ms per node, bytes of each collective it started."""

    node_ms: dict[str, float] = field(default_factory=dict)
    host_ms: dict[str, float] = field(default_factory=dict)
    comm_bytes: dict[str, int] = field(default_factory=dict)
    offrank_bytes: dict[str, tuple[float, float]] = field(default_factory=dict)
    """All-to-all start node -> (bytes sent to other ranks, bytes received from them)."""
    comm_ms: dict[str, float] = field(default_factory=dict)
    """Collective start node -> its measured time on the real group."""

    def to_json(self) -> dict:
        return {"node_ms": self.node_ms, "host_ms": self.host_ms, "comm_bytes": self.comm_bytes,
                "offrank_bytes": _pairs_to_json(self.offrank_bytes), "comm_ms": self.comm_ms}

    @classmethod
    def from_json(cls, data: dict) -> RankCosts:
        return cls(
            node_ms={n: float(v) for n, v in data["node_ms"].items()},
            host_ms={n: float(v) for n, v in data["host_ms"].items()},
            comm_bytes={n: int(v) for n, v in data["comm_bytes"].items()},
            offrank_bytes=_pairs_from_json(data.get("offrank_bytes", {})),
            comm_ms={n: float(v) for n, v in data.get("comm_ms", {}).items()},
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
    offrank_bytes: dict[str, tuple[float, float]] = field(default_factory=dict)
    """All-to-all start node -> (bytes sent to other ranks, bytes received from them), median over passes and
    ranks; empty in profiles made before this was recorded."""
    world_size: int = 1
    comm_ms: dict[str, float] = field(default_factory=dict)
    """Collective start node -> measured time on the real group (median over passes and ranks); empty for
    single-process profiles and profiles made before collectives were timed."""
    ranks: list[RankCosts] = field(default_factory=list)
    """Each rank's own medians over passes (rank order); empty for single-process profiles."""
    optimizer_ms: float = 0.0
    """The optimizer update that follows the step graph (slowest rank)."""
    issue_ms: float = 0.0
    """Host time to issue the whole graph in its generated code, not counting host waits for split sizes
    (median over runs and ranks; 0 in profiles made before it was measured)."""
    executor: ExecutorProfile | None = None
    """Region timings under the compiled or CUDA-graph executor (``lancet profile --executor``); None: the
    graph was profiled for the interpreted executor only (and in profiles made before executors existed)."""

    def without_comm_times(self) -> ComputeProfile:
        """This profile with no measured collective times (for pricing under another network than it ran on)."""
        ranks = [replace(r, comm_ms={}) for r in self.ranks]
        return replace(self, comm_ms={}, ranks=ranks)

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
            "offrank_bytes": _pairs_to_json(self.offrank_bytes),
            "world_size": self.world_size,
            "comm_ms": self.comm_ms,
            "issue_ms": self.issue_ms,
            "executor": None if self.executor is None else self.executor.to_json(),
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
            offrank_bytes=_pairs_from_json(data.get("offrank_bytes", {})),
            world_size=int(data.get("world_size", max(len(data.get("ranks", [])), 1))),
            comm_ms={n: float(v) for n, v in data.get("comm_ms", {}).items()},
            issue_ms=float(data.get("issue_ms", 0.0)),
            executor=ExecutorProfile.from_json(data["executor"]) if data.get("executor") else None,
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
    world = dist.get_world_size(group) if group is not None else 1
    per_pass: dict[str, list[dict[str, float]]] = {
        "ms": [], "host": [], "bytes": [], "send": [], "recv": [], "comm": []
    }
    keys: dict[str, str] = {}
    for i, inputs in enumerate(batches):
        timer = NodeTimer(gm, device, reps=reps, warmup=warmup, group=group)
        with torch.no_grad():
            timer.run(*inputs)
        per_pass["ms"].append(timer.node_ms)
        per_pass["host"].append(timer.host_ms)
        per_pass["bytes"].append({k: float(v) for k, v in timer.out_bytes.items()})
        per_pass["send"].append({k: float(v[0]) for k, v in timer.offrank.items()})
        per_pass["recv"].append({k: float(v[1]) for k, v in timer.offrank.items()})
        per_pass["comm"].append(timer.comm_ms)
        keys.update(timer.node_key)
        if progress is not None:
            progress(i + 1)
    mine = {name: _median_dicts(dicts) for name, dicts in per_pass.items()}
    mine["issue"] = {"graph": measure_issue_ms(gm, batches[0], device)}
    starts = [n for n in gm.graph.nodes if node_role(n) == Role.COMM_START]
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
    offrank = lambda d: {n: (d["send"][n], d["recv"][n]) for n in d["send"]}  # noqa: E731
    ranks = [
        RankCosts(g["ms"], g["host"], {n.name: int(g["bytes"].get(n.name, 0)) for n in starts}, offrank(g), g["comm"])
        for g in gathered
    ] if world > 1 else []
    agreed = {name: _median_dicts([g[name] for g in gathered]) for name in mine}
    return ComputeProfile(
        fingerprint=graph_fingerprint(gm.graph),
        node_ms=agreed["ms"],
        host_ms=agreed["host"],
        node_key={n: keys[n] for n in agreed["ms"]},
        out_bytes={n: int(b) for n, b in agreed["bytes"].items()},
        comm_bytes={n.name: int(agreed["bytes"].get(n.name, 0)) for n in starts},
        comm_kind={n.name: collective_kind(n) for n in starts},
        passes=len(batches),
        offrank_bytes=offrank(agreed),
        world_size=world,
        comm_ms=agreed["comm"],
        ranks=ranks,
        issue_ms=agreed["issue"]["graph"],
    )


def measure_issue_ms(gm: fx.GraphModule, inputs: list[torch.Tensor], device: torch.device, runs: int = 3) -> float:
    """Host ms to issue one run of the whole graph through its generated code (median of ``runs`` after a
    warm-up run), less the time blocked in host waits for split sizes; the device drains between runs.

    Per-node host times are measured by repeating one call on the same arguments; the whole graph
    also pays for fresh allocations, freeing, and the Python between calls, which this captures.
    On a device far behind the host the launch queue can fill and block the host too (more than
    about a thousand queued kernels between two host waits); that time is counted as issue time.
    """
    from lancet.moe.host_copy import blocked_seconds

    def drain() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        for run in range(runs + 1):
            drain()
            blocked, begin = blocked_seconds(), time.perf_counter()
            gm(*inputs)
            elapsed = time.perf_counter() - begin - (blocked_seconds() - blocked)
            drain()
            if run:
                times.append(elapsed * 1e3)
    return statistics.median(times)
