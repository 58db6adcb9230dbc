"""The step function of every bench variant, with the executor it runs under.

Variants: ``eager`` (the step function op by op), ``eager-compiled``
(``torch.compile`` of the step function with default options, or those of
``LANCET_INDUCTOR_OPTIONS`` as for the compiled regions: graph breaks
where it reads split sizes on the host and at the backward, as a user would
first try), and the captured graphs ``captured``, ``tutel-dN``, ``part-dN``,
``lancet-dw``, ``lancet-part`` and ``lancet``, each under an executor
(``captured:compiled``; none named: the bench's ``--executor``, else the fastest
the graph and device allow). ``part-dN`` partitions every MoE block's forward,
from its attention to its end, into N parts (a fixed partition, no plan needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lancet.app.compile_progress import compile_progress
from lancet.runtime.inductor_options import compile_options

TORCH_COMPILE = "torch.compile"
"""The executor label of ``eager-compiled``."""
PART_PREFIX = "part-d"
"""``part-dN``: every MoE block's forward, from its attention to its end, in N parts."""


def block_partition_graph(train_step, tokens: torch.Tensor, targets: torch.Tensor, parts: int):
    """The step with the block around every MoE layer (``block_ranges``) in ``parts`` parts."""
    from lancet.capture.trace import capture_forward
    from lancet.passes.partition.rewrite import PartitionDecisions, Region, partition_pass
    from lancet.passes.partition.select import block_ranges
    from lancet.plan.plan import capture_partitioned_step

    forward = capture_forward(train_step, tokens, targets)
    regions = [Region(start, end, parts) for start, end in block_ranges(forward, tokens.shape[0])]
    partitioned = partition_pass(forward, PartitionDecisions(regions), tokens.shape[0])
    return capture_partitioned_step(train_step, partitioned, tokens, targets)


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
        if report is None:
            return None
        reruns = getattr(self.step, "capture_reruns", None)
        return {**report.to_json(), **({"capture_reruns": reruns()} if reruns is not None else {})}


def _captured_graph(base: str, session, plan, parts_prefix: str, plan_variants: tuple[str, ...]):
    batch = session.batch(0)
    if base in plan_variants:
        from lancet.plan.plan import build_step_graph

        return build_step_graph(session.train_step, *batch, plan, base)
    if base.startswith(parts_prefix):
        from lancet.plan.plan import tutel_graph

        return tutel_graph(session.train_step, *batch, int(base[len(parts_prefix):]))
    if base.startswith(PART_PREFIX):  # names were checked before any runner is built (bench.is_known_variant)
        return block_partition_graph(session.train_step, *batch, int(base[len(PART_PREFIX):]))
    from lancet.capture.trace import capture_step

    return capture_step(session.train_step, *batch)


def build_runner(base: str, executor: str | None, session, plan, *, parts_prefix: str,
                 plan_variants: tuple[str, ...], functions: dict | None = None,
                 inline_collectives: bool = False) -> VariantRunner:
    """The runner of graph variant ``base`` under ``executor`` (None: the default for its graph and device).

    ``functions``: compiled regions shared between the variants of one bench (see ``make_executor``);
    ``inline_collectives``: collectives that nothing overlaps on the compute stream (else the environment's
    default, ``LANCET_INLINE_COLLECTIVES``).
    """
    from lancet.moe import MoELayer

    layers = [m for m in session.train_step.model.modules() if isinstance(m, MoELayer)]
    eager_a2a = sum(layer.forward_all_to_alls for layer in layers)  # counts (ragged), dispatch, combine
    if base == "eager":
        return VariantRunner(session.train_step, eager_a2a, None)
    if base == "eager-compiled":
        compiled = torch.compile(session.train_step.__call__, **compile_options("inductor"))
        return VariantRunner(compiled, eager_a2a, TORCH_COMPILE)
    from lancet.graph.analysis import analyze
    from lancet.runtime.executor import make_executor

    train_graph = _captured_graph(base, session, plan, parts_prefix, plan_variants)
    forward_a2a = len(analyze(train_graph).collectives_of("all_to_all", "forward"))
    from lancet.app.bench import INLINE_SUFFIX

    label = (base if executor is None else f"{base}:{executor}") + (INLINE_SUFFIX if inline_collectives else "")
    options = {"inline_collectives": True} if inline_collectives else {}
    runner = make_executor(train_graph, executor, progress=compile_progress(session.runtime.is_main, label),
                           functions=functions, **options)
    return VariantRunner(runner, forward_a2a, runner.kind, runner.note)
