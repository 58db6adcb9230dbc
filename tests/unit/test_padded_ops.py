"""The padded dispatch's custom ops against plain Python, their autograd and fake shapes; the dispatch setting."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lancet.app.config import ModelSpec, RunConfig
from lancet.moe import GateConfig
from lancet.moe.padded import capacity_slots, slot_gather, slot_scatter
from lancet.passes.partition.axes import REPLICATED, TOKEN, Context, Inferred, infer
from lancet.plan.artifact import ArtifactMismatch, read_artifact, write_artifact
from tests.dense_reference import python_capacity, python_positions


def _python_slots(experts, probs, num_experts, cf, kind):
    """Slot = expert * C + arrival position in serving order, -1 when dropped."""
    capacity = python_capacity(len(experts), num_experts, cf)
    positions = python_positions(experts, probs, num_experts, kind)
    return [e * capacity + p if p < capacity else -1 for e, p in zip(experts, positions)]


@pytest.mark.parametrize("kind", ["switch", "batch_prioritized"])
@pytest.mark.parametrize("tokens, experts, cf",
                         [(24, 4, 1.0), (13, 3, 0.5), (10, 4, 2.0), (7, 8, 1.0), (5, 2, 4.0), (96, 4, 1.0)])
def test_capacity_slots_follow_the_gate_rule(kind, tokens, experts, cf):
    generator = torch.Generator().manual_seed(tokens * experts)
    expert_T = torch.randint(0, experts, (tokens,), generator=generator)
    # Coarse probabilities so that ties occur (ties go to the earlier token).
    prob_T = torch.randint(1, 4, (tokens,), generator=generator).float() / 4
    priority = prob_T if kind == "batch_prioritized" else None
    slots = capacity_slots(expert_T, priority, experts, cf)
    assert slots.tolist() == _python_slots(expert_T.tolist(), prob_T.tolist(), experts, cf, kind)


def test_scatter_and_gather_are_each_others_backward():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    expert_T = torch.randint(0, 4, (10,), generator=generator)
    slots = capacity_slots(expert_T, None, 4, 1.0)  # capacity 3
    buffer = slot_scatter(rows, slots, 4, 1.0)
    assert buffer.shape == (4, 3, 3)
    kept = slots >= 0
    assert torch.equal(buffer.reshape(-1, 3)[slots[kept]], rows[kept].detach())
    assert int((buffer.reshape(-1, 3).abs().sum(1) > 0).sum()) == int(kept.sum())  # the other slots are empty
    back = slot_gather(buffer, slots, 4, 1.0)
    assert torch.equal(back[kept], rows[kept].detach()) and torch.equal(back[~kept], torch.zeros_like(back[~kept]))
    assert torch.autograd.gradcheck(lambda r: slot_gather(slot_scatter(r, slots, 4, 1.0) * 2.0, slots, 4, 1.0), rows)
    assert torch.autograd.gradcheck(lambda b: slot_scatter(slot_gather(b, slots, 4, 1.0), slots, 4, 1.0),
                                    buffer.detach().requires_grad_())


def test_ops_trace_with_static_shapes_and_capacity_from_their_input():
    def dispatch(rows, expert_T):
        slots = capacity_slots(expert_T, None, 4, 1.5)
        return slot_gather(slot_scatter(rows, slots, 4, 1.5), slots, 4, 1.5), slot_scatter(rows, slots, 4, 1.5)

    graph = make_fx(dispatch, tracing_mode="symbolic")(torch.randn(20, 8), torch.randint(0, 4, (20,)))
    nodes = {str(n.target): n for n in graph.graph.nodes if n.op == "call_function"}
    assert tuple(nodes["lancet.slot_scatter.default"].meta["val"].shape) == (4, int(1.5 * 5), 8)
    assert tuple(nodes["lancet.slot_gather.default"].meta["val"].shape) == (20, 8)
    # The same graph on fewer tokens makes buffers of their own capacity.
    out, buffer = graph(torch.randn(8, 8), torch.randint(0, 4, (8,)))
    assert out.shape == (8, 8) and buffer.shape == (4, 3, 8)


def test_zero_capacity_and_mismatched_buffers_are_refused():
    with pytest.raises(ValueError, match="capacity .* is 0"):
        capacity_slots(torch.zeros(3, dtype=torch.int64), None, 8, 0.5)
    slots = capacity_slots(torch.zeros(4, dtype=torch.int64), None, 2, 1.0)
    with pytest.raises(ValueError, match="does not hold 2 experts x capacity 2"):
        slot_gather(torch.zeros(2, 3, 5), slots, 2, 1.0)


def test_token_axis_rules_of_the_padded_ops():
    def dispatch(rows, expert_T):
        slots = capacity_slots(expert_T, None, 4, 1.0)
        return slot_gather(slot_scatter(rows, slots, 4, 1.0), slots, 4, 1.0)

    graph = make_fx(dispatch, tracing_mode="symbolic")(torch.randn(8, 2), torch.randint(0, 4, (8,)))
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    axes = {p: Inferred(TOKEN(0)) for p in placeholders}
    ctx = Context(axes, batch_size=2)
    found = {}
    for node in graph.graph.nodes:
        if node.op == "call_function":
            axes[node] = infer(node, ctx)
            found[str(node.target)] = axes[node].axis
    assert found["lancet.capacity_slots.default"] == TOKEN(0)
    assert found["lancet.slot_scatter.default"].kind == "rows"
    assert found["lancet.slot_gather.default"] == TOKEN(0)
    assert found["lancet.capacity_slots.default"] != REPLICATED


def test_dispatch_defaults_and_refusals():
    assert GateConfig(kind="switch").dispatch == "padded"
    assert GateConfig(kind="batch_prioritized").dispatch == "padded"
    assert GateConfig(kind="topk").dispatch == "ragged"
    assert GateConfig(kind="switch", dispatch="ragged").dispatch == "ragged"
    with pytest.raises(ValueError, match="dropless"):
        GateConfig(kind="topk", dispatch="padded")
    with pytest.raises(ValueError, match="unknown dispatch"):
        GateConfig(kind="switch", dispatch="sparse")


def test_profiles_of_one_dispatch_are_refused_for_the_other(tmp_path):
    padded = RunConfig(spec=ModelSpec(gate="switch")).identity(2, torch.device("cpu"))
    ragged = RunConfig(spec=ModelSpec(gate="switch", dispatch="ragged")).identity(2, torch.device("cpu"))
    topk = RunConfig(spec=ModelSpec(gate="topk", capacity_factor=1.25)).identity(2, torch.device("cpu"))
    assert (padded.gate, ragged.gate, topk.gate) == ("switch_padded", "switch_ragged", "topk2_cf1.25_ragged")
    write_artifact(tmp_path / "profile.json", "profile", padded, {})
    read_artifact(tmp_path / "profile.json", "profile", padded)
    with pytest.raises(ArtifactMismatch, match="gate: file has 'switch_padded', run has 'switch_ragged'"):
        read_artifact(tmp_path / "profile.json", "profile", ragged)
