"""The step function of every bench variant, with the executor it runs under.

Variants: ``eager`` (the step function op by op), ``eager-compiled``
(``torch.compile`` of the step function with default options: graph breaks
where it reads split sizes on the host and at the backward, as a user would
first try), and the captured graphs ``captured``, ``tutel-dN``, ``lancet-dw``,
``lancet-part`` and ``lancet``, each under an executor (``captured:compiled``;
none named: the bench's ``--executor``, else the fastest the graph and device
allow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lancet.app.compile_progress import compile_progress

TORCH_COMPILE = "torch.compile"
"""The executor label of ``eager-compiled``."""


@dataclass(slots=True)
class VariantRunner:
    """A variant's step function, what it runs under, and what its forward issues."""

    step: Callable
    forward_a2a: int
    """All-to-alls the forward issues (the later ones of a step are the backward's)."""
    executor: str | None
    """``interpret``, ``compiled``, ``cudagraph``, ``torch.compile``; None for ``eager``."""
    note: str | None = None
    """Why the executor differs from the one asked for (a step that cannot be graphed), if it does."""

    def compile_report(self) -> dict | None:
        report = getattr(self.step, "compile_report", None)
        return None if report is None else report.to_json()


def _captured_graph(base: str, session, plan, parts_prefix: str, plan_variants: tuple[str, ...]):
    batch = session.batch(0)
    if base in plan_variants:
        from lancet.plan.plan import build_step_graph

        return build_step_graph(session.train_step, *batch, plan, base)
    if base.startswith(parts_prefix):
        from lancet.plan.plan import tutel_graph

        return tutel_graph(session.train_step, *batch, int(base[len(parts_prefix):]))
    from lancet.capture.trace import capture_step

    return capture_step(session.train_step, *batch)


def build_runner(base: str, executor: str | None, session, plan, *, parts_prefix: str,
                 plan_variants: tuple[str, ...], functions: dict | None = None) -> VariantRunner:
    """The runner of graph variant ``base`` under ``executor`` (None: the default for its graph and device).

    ``functions``: compiled regions shared between the variants of one bench (see ``make_executor``).
    """
    moe_layers = sum(1 for i in range(session.model_cfg.num_layers) if session.model_cfg.is_moe_block(i))
    if base == "eager":
        return VariantRunner(session.train_step, 3 * moe_layers, None)  # counts, dispatch, combine per layer
    if base == "eager-compiled":
        return VariantRunner(torch.compile(session.train_step.__call__), 3 * moe_layers, TORCH_COMPILE)
    from lancet.graph.analysis import analyze
    from lancet.runtime.executor import make_executor

    train_graph = _captured_graph(base, session, plan, parts_prefix, plan_variants)
    forward_a2a = len(analyze(train_graph).collectives_of("all_to_all", "forward"))
    label = base if executor is None else f"{base}:{executor}"
    runner = make_executor(train_graph, executor, progress=compile_progress(session.runtime.is_main, label),
                           functions=functions)
    return VariantRunner(runner, forward_a2a, runner.kind, runner.note)
