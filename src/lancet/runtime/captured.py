"""Run a captured (and possibly rewritten) training-step graph every step.

The graph is traced once; each call replays it on the current parameters and
a fresh batch. Routing, and with it every all-to-all's split sizes, is
recomputed from the data on each replay. Gradients are handed back in
parameter order for a standard torch optimizer.

``CapturedStep`` runs the graph's generated code as it is (the reference the
other executors are checked against); ``captured_runner`` builds the executor a
run asks for (``lancet.runtime.executor``).
"""

from __future__ import annotations

import torch

from lancet.capture.trace import TrainGraph, capture_step
from lancet.step.train_step import StepResult


class CapturedStep:
    """Callable with the eager ``TrainStep`` signature that runs a TrainGraph."""

    def __init__(self, train_graph: TrainGraph) -> None:
        self.train_graph = train_graph
        self._forward = train_graph.gm.forward

    def __call__(self, params: list[torch.Tensor], tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> StepResult:
        graph = self.train_graph
        graph.check_batch(tokens_BS, targets_BS)
        with torch.no_grad():
            outputs = self._forward(*params, tokens_BS, targets_BS)
        num_params = graph.num_params
        return StepResult(
            loss=outputs[0], grads=list(outputs[1 : 1 + num_params]), keep=list(outputs[1 + num_params :])
        )


def captured_runner(session, plan_path: str | None = None, variant: str = "lancet", executor: str | None = None,
                    progress=None):
    """Capture the session's step on its first batch (``variant`` of a plan if given) and return its executor
    (``executor``: interpret, compiled, cudagraph; None: the default for the graph and device)."""
    from lancet.runtime.executor import make_executor

    if plan_path is not None:
        from lancet.plan.plan import plan_runner_graph

        train_graph = plan_runner_graph(session, plan_path, variant)
    else:
        train_graph = capture_step(session.train_step, *session.batch(0))
    return make_executor(train_graph, executor, progress=progress)
