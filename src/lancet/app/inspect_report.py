"""``lancet inspect``: what the captured step graph holds, as a table and as JSON."""

from __future__ import annotations

import json
from collections import Counter

from rich.console import Console
from rich.table import Table

from lancet.capture.trace import TrainGraph
from lancet.graph.analysis import GraphAnalysis
from lancet.graph.roles import Role, is_view
from lancet.graph.shapes import ShapeRecorder


def _op_name(node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if not hasattr(target, "_schema") else str(target).rsplit(".", 1)[0]


def summarize(train_graph: TrainGraph, analysis: GraphAnalysis, shapes: ShapeRecorder) -> dict:
    """A JSON-ready description of the graph: counts, collectives with bytes, dW set, host syncs."""
    nodes = list(analysis.graph.nodes)
    role_counts = Counter(analysis.roles[n].value for n in nodes)
    phase_counts = Counter(analysis.phase[n] for n in nodes if analysis.roles[n] == Role.COMPUTE)
    views = sum(1 for n in nodes if analysis.roles[n] == Role.COMPUTE and is_view(n))
    collectives = [
        {
            "name": c.start.name,
            "kind": c.kind,
            "phase": c.phase,
            "purpose": c.purpose,
            "layer": c.layer,
            "bytes": shapes.output_bytes.get(c.start.name, 0),
        }
        for c in analysis.collectives
    ]
    dw_ops = Counter(_op_name(n) for n in analysis.dw_nodes if not is_view(n))
    summary = {
        "nodes": len(nodes),
        "roles": dict(role_counts),
        "compute_by_phase": dict(phase_counts),
        "view_nodes": views,
        "moe_layers": [
            {"index": layer.index, "module": layer.module, "dispatch": layer.dispatch.start.name,
             "combine": layer.combine.start.name}
            for layer in analysis.moe_layers
        ],
        "collectives": collectives,
        "dw": {"nodes": len(analysis.dw_nodes), "non_view_nodes": sum(dw_ops.values()), "ops": dict(dw_ops)},
        "host_syncs": [n.name for n in analysis.host_syncs],
    }
    from lancet.passes.partition.axes import unsupported_ops

    summary["ops_without_partition_rule"] = unsupported_ops(analysis.graph)
    return summary


def partition_findings(train_step, tokens, targets) -> list[dict]:
    """Why the range search would find no range, or ranges that run whole from some op on (as JSON)."""
    from lancet.capture.trace import capture_forward
    from lancet.passes.partition.select import range_findings

    forward = capture_forward(train_step, tokens, targets)
    return [f.to_json() for f in range_findings(forward, tokens.shape[0])]


def print_summary(summary: dict, console: Console) -> None:
    console.print(f"[bold]captured step graph[/]: {summary['nodes']} nodes  {summary['roles']}")
    console.print(f"compute nodes by phase: {summary['compute_by_phase']} ({summary['view_nodes']} are views)")
    table = Table(title="collectives (bytes on rank 0 for this batch)")
    for column in ("name", "kind", "phase", "purpose", "layer", "MB"):
        table.add_column(column)
    for c in summary["collectives"]:
        layer = "" if c["layer"] is None else str(c["layer"])
        table.add_row(c["name"], c["kind"], c["phase"], c["purpose"], layer, f"{c['bytes'] / 1e6:.3f}")
    console.print(table)
    dw = summary["dw"]
    console.print(f"[bold]dW set[/]: {dw['nodes']} nodes ({dw['non_view_nodes']} launch kernels): {dw['ops']}")
    console.print(f"[bold]host syncs[/]: {len(summary['host_syncs'])}: {', '.join(summary['host_syncs'])}")
    missing = summary["ops_without_partition_rule"]
    console.print(f"[bold]ops with no partition rule[/]: {', '.join(missing) if missing else 'none'}")
    from lancet.passes.partition.findings import Finding

    for finding in summary.get("partition_findings", []):
        console.print(f"[yellow]partition[/]: {Finding.from_json(finding).line()}")


def write_json(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
