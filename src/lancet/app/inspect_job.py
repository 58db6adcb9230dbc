"""The rank-side job of ``lancet inspect``."""

from __future__ import annotations

from rich.console import Console

from lancet.capture.trace import capture_step
from lancet.app.config import RunConfig
from lancet.runtime.dist import rank_runtime
from lancet.graph.analysis import analyze
from lancet.graph.shapes import record_shapes
from lancet.app.inspect_report import partition_findings, print_summary, summarize, write_json
from lancet.app.train import build_session


def inspect_worker(run: RunConfig, json_path: str | None) -> dict:
    with rank_runtime(run.network, run.collective_timeout, run.emulation()) as runtime:
        session = build_session(run, runtime)
        tokens, targets = session.batch(0)
        train_graph = capture_step(session.train_step, tokens, targets)
        analysis = analyze(train_graph)
        shapes = record_shapes(train_graph.gm, [*session.params, tokens, targets])
        summary = summarize(train_graph, analysis, shapes)
        summary["partition_findings"] = partition_findings(session.train_step, tokens, targets)
        if runtime.is_main:
            print_summary(summary, Console())
            if json_path:
                write_json(summary, json_path)
        return summary
