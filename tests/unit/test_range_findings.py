"""The range search says why it found nothing, or which op cuts a range short (op, node, module)."""

from __future__ import annotations

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.capture.trace import ForwardGraph, capture_forward
from lancet.graph.meta import dispatch_region
from lancet.passes.partition.findings import NO_MOE_LAYER, NO_RULE
from lancet.passes.partition.select import candidate_ranges, range_findings
from lancet.step.train_step import TrainStep


def _forward(fn) -> ForwardGraph:
    with fx_traceback.preserve_node_meta():  # as capture traces: annotations reach node.meta
        gm = make_fx(fn)(torch.randn(3), torch.randn(4, 3))
    return ForwardGraph(gm=gm, param_names=["w"], batch_shape=(4, 3))


def test_a_graph_without_moe_layers_is_reported():
    findings = range_findings(_forward(lambda w, x: (x * w).sum()), 4)
    assert [f.kind for f in findings] == [NO_MOE_LAYER]


def _with_an_op_without_rule(w, x):
    h = torch.special.erfinv(torch.tanh(x + 1))
    with dispatch_region():
        y = h * 2
    return (torch.sigmoid(y) + 1).sum()


def test_an_op_without_a_rule_inside_a_range_is_named():
    forward = _forward(_with_an_op_without_rule)
    assert candidate_ranges(forward, 4), "the marked dispatch stage is a MoE layer with ranges around it"
    findings = range_findings(forward, 4)
    assert [(f.kind, f.op) for f in findings] == [(NO_RULE, "aten.erfinv.default")]
    assert findings[0].node == "erfinv" and "no rule for aten.erfinv.default" in findings[0].line()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.special.erfinv(torch.tanh(x + 1))
        with dispatch_region():
            y = h * self.w
        return (torch.sigmoid(y) + 1).sum()


def test_a_captured_step_names_the_source_line_of_the_op():
    step = TrainStep(_Tiny(), None, loss_fn=lambda out, targets: out)
    forward = capture_forward(step, torch.randn(4, 3), torch.zeros(4))
    (finding,) = range_findings(forward, 4)
    assert finding.module == "<model>" and finding.op == "aten.erfinv.default"
    assert finding.source.startswith(f"{__file__}:") and "torch.special.erfinv" in finding.source, finding.source
