"""The forward graph ends at the model's output; the loss runs on the rebuilt output with its own backward."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.app.data import BatchSource
from lancet.app.variant_runners import block_partition_graph
from lancet.capture.trace import capture_step
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.plan.optimize import fake_process_group
from lancet.plan.plan import tutel_graph
from lancet.step.output_tree import OutputError, flatten_output
from lancet.step.train_step import TrainStep

@dataclass(slots=True)
class _Out:
    hidden: torch.Tensor
    extras: dict
    size: int


class _Pair(NamedTuple):
    a: torch.Tensor
    b: list


def test_output_tree_rebuilds_nested_containers_and_dataclasses_around_new_tensors():
    x, y, z = torch.zeros(2), torch.ones(3), torch.full((1,), 2.0)
    out = _Out(hidden=x, extras={"pair": _Pair(y, [z, None]), "name": "head"}, size=7)
    tensors, tree = flatten_output(out)
    assert len(tensors) == 3 and [t is u for t, u in zip(tensors, (x, y, z))] == [True] * 3 and tree.num_tensors == 3
    new = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])]
    rebuilt = tree.rebuild(new)
    assert isinstance(rebuilt, _Out) and rebuilt is not out and out.hidden is x  # the original is untouched
    assert rebuilt.hidden is new[0] and rebuilt.size == 7 and rebuilt.extras["name"] == "head"
    assert isinstance(rebuilt.extras["pair"], _Pair) and rebuilt.extras["pair"].a is new[1]
    assert rebuilt.extras["pair"].b[0] is new[2] and rebuilt.extras["pair"].b[1] is None
    with pytest.raises(ValueError, match="holds 3 tensors, got 2"):
        tree.rebuild(new[:2])


def test_a_plain_output_object_is_rebuilt_from_its_attributes():
    class Holder:
        def __init__(self, x):
            self.logits, self.note = x, "plain"

    holder = Holder(torch.zeros(1))
    tensors, tree = flatten_output([holder, 3])
    assert tensors == [holder.logits]
    rebuilt, three = tree.rebuild([torch.ones(2)])
    assert isinstance(rebuilt, Holder) and rebuilt.logits.shape == (2,) and rebuilt.note == "plain" and three == 3
    assert holder.logits.shape == (1,)


def test_an_output_size_that_depends_on_the_batch_is_refused():
    def forward(x):
        flatten_output((x, x.shape[0]))
        return x

    with pytest.raises(OutputError, match=r"output\[1\] is a size that depends on the batch"):
        make_fx(forward, tracing_mode="symbolic")(torch.zeros(4))


def _vocab_gemms(graph, padded_vocab: int) -> Counter:
    """GEMMs of the step that make or consume a [*, P] (vocabulary) operand, by output shape."""
    found = Counter()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.mm.default,):
            shape = tuple(node.meta["val"].shape)
            inputs = [tuple(a.meta["val"].shape) for a in node.args if hasattr(a, "meta") and "val" in a.meta]
            if padded_vocab in shape or any(padded_vocab in s for s in inputs):
                found[shape] += 1
    return found


def test_partitioned_steps_keep_the_fused_loss_and_its_backward():
    """A rewritten forward used to carry the loss's ops into autograd: the step then differentiated the
    loss's float32 softmax as well as running its fused gradients. Now it has the captured step's loss GEMMs."""
    with fake_process_group(2):
        group = dist.group.WORLD
        cfg = model_config("gpt2_moe_nl2_m32_nh2_sl8_b4", vocab_size=197, gate=GateConfig(kind="switch"))
        step = TrainStep(build_model(cfg, group), group, bucket_bytes=8192)
        tokens, targets = BatchSource(batch_size=4, seq_len=8, vocab_size=197).batch(0, 0)
        captured = _vocab_gemms(capture_step(step, tokens, targets).graph, cfg.padded_vocab_size)
        assert sum(captured.values()) == 3  # logits, gradient of the hidden states, gradient of the head weight
        for graph in (tutel_graph(step, tokens, targets, 2), block_partition_graph(step, tokens, targets, 2)):
            assert _vocab_gemms(graph.graph, cfg.padded_vocab_size) == captured
            float_logits = [n for n in graph.graph.nodes if n.op == "call_function" and "val" in n.meta
                            and getattr(n.meta["val"], "shape", None) == (32, cfg.padded_vocab_size)
                            and n.meta["val"].dtype == torch.float32 and n.meta.get("custom", {}).get("phase") == "backward"]
            assert float_logits == []  # no float32 logits gradient in the backward


def test_a_forward_graph_built_by_hand_cannot_run_a_step():
    from lancet.capture.trace import ForwardGraph, capture_step_from_forward

    gm = make_fx(lambda x: (x * 2,))(torch.zeros(2))
    with pytest.raises(ValueError, match="make it with capture_forward"):
        capture_step_from_forward(None, ForwardGraph(gm=gm, param_names=[], batch_shape=(2,)), None, None)
