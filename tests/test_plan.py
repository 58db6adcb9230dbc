"""Plans: chosen by simulation, re-applied identically to a fresh capture, refused for another run."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lancet.artifact import ArtifactMismatch, RunIdentity, read_artifact, write_artifact
from lancet.capture import capture_step
from lancet.cost.model import ToyCostModel
from lancet.data import BatchSource
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.optimize import fake_process_group
from lancet.plan import PlanMismatch, apply_plan, load_plan, make_plan
from lancet.sim import simulate
from lancet.step import TrainStep

IDENTITY = RunIdentity(model="m", gate="switch", world_size=2, dtype="fp32", device="cpu", network="native",
                       torch_version="x")


def _capture(layers: int = 4):
    group = dist.group.WORLD
    cfg = model_config(f"gpt2_moe_nl{layers}_m32_nh2_sl8_b3", vocab_size=97, gate=GateConfig(kind="switch"))
    step = TrainStep(build_model(cfg, group), group, bucket_bytes=8192)
    source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
    return capture_step(step, *source.batch(0, 0))


def test_plan_is_the_fastest_candidate_and_reapplies_identically(tmp_path):
    with fake_process_group(2):
        graph = _capture()
        costs = ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5, "all_reduce": 0.2}).costs(graph.graph)
        plan, before, after = make_plan(graph, costs, IDENTITY)
        candidates = plan.predicted["candidates"]
        assert after.makespan_ms == min(c["makespan_ms"] for c in candidates.values())
        assert after.makespan_ms < before.makespan_ms
        assert simulate(graph.graph, costs).makespan_ms == pytest.approx(after.makespan_ms)
        plan.write(str(tmp_path / "plan.json"))
        fresh = _capture()
        apply_plan(fresh, load_plan(str(tmp_path / "plan.json"), IDENTITY))
        assert [n.name for n in fresh.graph.nodes] == [n.name for n in graph.graph.nodes]


def test_plan_for_another_graph_is_refused(tmp_path):
    with fake_process_group(2):
        graph = _capture(4)
        costs = ToyCostModel().costs(graph.graph)
        plan, _, _ = make_plan(graph, costs, IDENTITY)
        with pytest.raises(PlanMismatch, match="re-profile"):
            apply_plan(_capture(2), plan)


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
