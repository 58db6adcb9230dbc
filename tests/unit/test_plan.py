"""Plans: the fastest simulated order, re-applied identically to a fresh capture, refused for another run;
the partition range search."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from lancet.plan.artifact import ArtifactMismatch, RunIdentity, read_artifact, write_artifact
from lancet.capture.trace import capture_forward, capture_step
from lancet.cost.model import NodeCosts, ToyCostModel
from lancet.app.data import BatchSource
from lancet.graph.roles import Role, is_view, node_role
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.plan.optimize import fake_process_group
from lancet.passes.partition.axes import unsupported_ops
from lancet.passes.partition.rewrite import drop_semantics
from lancet.passes.partition.select import candidate_ranges, dispatch_ranges, select_partitions
from lancet.plan.plan import Plan, PlanMismatch, VariantPlan, build_step_graph, choose_order, load_plan
from lancet.cost.profile import graph_fingerprint
from lancet.sim.simulator import simulate
from lancet.step.train_step import TrainStep
from tests.distributed import run_ranks

IDENTITY = RunIdentity(model="m", gate="switch", world_size=2, dtype="fp32", device="cpu", network="native",
                       torch_version="x")


def _step(layers: int = 4, batch: int = 4, group=None):
    group = group or dist.group.WORLD
    cfg = model_config(f"gpt2_moe_nl{layers}_m32_nh2_sl8_b{batch}", vocab_size=97, gate=GateConfig(kind="switch"))
    step = TrainStep(build_model(cfg, group), group, bucket_bytes=8192)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    return step, *source.batch(0, 0)


def test_order_plan_is_the_fastest_candidate_and_reapplies_identically(tmp_path):
    with fake_process_group(2):
        step, tokens, targets = _step()
        graph = capture_step(step, tokens, targets)
        fingerprint = graph_fingerprint(graph.graph)
        costs = ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5, "all_reduce": 0.2}).costs(graph.graph)
        choice, before = choose_order(graph, costs)
        assert choice.timeline.makespan_ms == min(c["makespan_ms"] for c in choice.candidates.values())
        assert choice.timeline.makespan_ms < before.makespan_ms
        assert simulate(graph.graph, costs).makespan_ms == pytest.approx(choice.timeline.makespan_ms)
        plan = Plan(identity=IDENTITY, fingerprint=fingerprint)
        plan.variants["lancet-dw"] = VariantPlan(dw=choice.dw, allreduce=choice.allreduce, step_fingerprint=fingerprint)
        plan.write(str(tmp_path / "plan.json"))
        fresh = build_step_graph(step, tokens, targets, load_plan(str(tmp_path / "plan.json"), IDENTITY), "lancet-dw")
        assert [n.name for n in fresh.graph.nodes] == [n.name for n in graph.graph.nodes]


def test_plan_for_another_graph_is_refused():
    with fake_process_group(2):
        step, tokens, targets = _step(4)
        fingerprint = graph_fingerprint(capture_step(step, tokens, targets).graph)
        plan = Plan(identity=IDENTITY, fingerprint=fingerprint)
        plan.variants["lancet-dw"] = VariantPlan(step_fingerprint=fingerprint)
        other, tokens, targets = _step(2)
        with pytest.raises(PlanMismatch, match="re-profile"):
            build_step_graph(other, tokens, targets, plan, "lancet-dw")
        with pytest.raises(PlanMismatch, match="no variant 'lancet'"):
            build_step_graph(other, tokens, targets, plan, "lancet")


def test_artifact_for_another_run_is_refused(tmp_path):
    path = tmp_path / "profile.json"
    write_artifact(path, "profile", IDENTITY, {"x": 1})
    other = RunIdentity(**{**IDENTITY.to_json(), "world_size": 4, "dtype": "bf16"})
    with pytest.raises(ArtifactMismatch) as info:
        read_artifact(path, "profile", other)
    assert "world_size: file has 2, run has 4" in str(info.value)
    assert "dtype: file has 'fp32', run has 'bf16'" in str(info.value)
    with pytest.raises(ArtifactMismatch, match="not a lancet plan"):
        read_artifact(path, "plan")


def _split_price(compute_ms: float, a2a_ms: float):
    """Toy pricing of (partitioned) graphs: a part does 1/parts of the work and ships 1/parts of the rows."""

    def price(graph) -> NodeCosts:
        costs = NodeCosts()
        for node in graph.nodes:
            parts = node.meta.get("custom", {}).get("parts") or 1
            share = 1.0 / parts if node.meta.get("custom", {}).get("part") is not None else 1.0
            if node_role(node) == Role.COMM_START:
                costs.comm_ms[node.name] = a2a_ms * share
            elif node_role(node) == Role.COMPUTE and not is_view(node) and node.op == "call_function":
                costs.compute_ms[node.name] = compute_ms * share
        return costs

    return price


def _select(group, a2a_ms: float) -> str:
    step, tokens, targets = _step(layers=3, batch=4, group=group)
    forward = capture_forward(step, tokens, targets)
    selection = select_partitions(forward, _split_price(0.01, a2a_ms), batch_size=4, max_parts=4)
    return json.dumps(selection.decisions.to_json(), sort_keys=True)


@pytest.mark.multirank
def test_range_search_partitions_when_communication_dominates_and_ranks_agree():
    chosen = run_ranks(_select, 2, 1.0)
    assert chosen[0] == chosen[1]
    regions = json.loads(chosen[0])["regions"]
    assert len(regions) == 2 and all(r["parts"] in (2, 4) for r in regions)


def test_range_search_keeps_the_graph_when_nothing_wins():
    with fake_process_group(2):
        step, tokens, targets = _step(layers=3, batch=4)
        forward = capture_forward(step, tokens, targets)
        ranges = candidate_ranges(forward, 4)
        # Per MoE layer: 3 starts (before the block's attention, before its MoE sublayer, the dispatch stage)
        # times 2 ends (after the block, after the next residual seam), found from the graph alone; the last
        # MoE block has no next seam (the forward graph ends at the model's output).
        assert len(ranges) == 3 * 2 + 3 * 1 and len({s for s, _ in ranges}) == 6 and len({e for _, e in ranges}) == 3
        selection = select_partitions(forward, _split_price(1.0, 0.0), batch_size=4)
        assert selection.decisions.regions == []


@pytest.mark.parametrize("dispatch, semantics", [("padded", "micro-batch"), ("ragged", "whole-batch")])
def test_plans_name_the_drop_semantics_of_their_dispatch(dispatch, semantics):
    with fake_process_group(2) as group:
        cfg = model_config("gpt2_moe_nl2_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch", dispatch=dispatch))
        step = TrainStep(build_model(cfg, group), group)
        source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
        forward = capture_forward(step, *source.batch(0, 0))
        assert drop_semantics(forward.graph) == semantics
        assert unsupported_ops(forward.graph) == []  # the fused loss's ops have rules too
        assert len(dispatch_ranges(forward.graph)) == 1  # the Tutel-style range of the one MoE layer
