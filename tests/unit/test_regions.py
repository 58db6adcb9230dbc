"""Regions and programs: compute between communication points, never across one; the plan's order kept.

Structure only (nothing is compiled or run): regions of hand-built and captured
graphs, and programs built from a captured, a dW-scheduled and a partitioned step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lancet.app.data import BatchSource
from lancet.app.variant_runners import block_partition_graph
from lancet.capture.trace import capture_step
from lancet.cost.model import ToyCostModel
from lancet.graph import meta
from lancet.graph.roles import Role, node_role, wait_of
from lancet.graph.regions import DYNAMIC, SMALL, STATIC, cut_regions, is_boundary, is_dynamic, node_phase
from lancet.models import build_model, model_config
from lancet.moe import GateConfig
from lancet.passes.dw import dw_pass
from lancet.plan.optimize import fake_process_group
from lancet.runtime.cudagraph import graph_blockers, why_not_graphed
from lancet.runtime.program import build_program, program_order
from lancet.step.train_step import TrainStep
from tests.graphs import GraphBuilder, aten, c10d


@pytest.fixture(scope="module")
def graphs() -> dict:
    """Step graphs of a one-layer model (two fake ranks): captured, dW-scheduled, part-d2 (tutel-d2's programs
    are checked as they run, in ``tests/multirank/test_executor.py``)."""
    with fake_process_group(2):
        group = dist.group.WORLD
        cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch", dispatch="ragged"))
        step = TrainStep(build_model(cfg, group), group, bucket_bytes=8192)
        source = BatchSource(batch_size=cfg.batch_size, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)
        tokens, targets = source.batch(0, 0)
        scheduled = capture_step(step, tokens, targets)
        costs = ToyCostModel(compute_ms=0.01, comm_ms={"all_to_all": 0.5}).costs(scheduled.graph)
        _, decisions = dw_pass(scheduled, costs)
        assert decisions.num_moved > 0
        return {"captured": capture_step(step, tokens, targets), "dw": scheduled,
                "part-d2": block_partition_graph(step, tokens, targets, 2)}


def test_regions_of_a_hand_built_graph_stop_at_collectives_and_phases():
    b = GraphBuilder()
    x, w, splits = b.input("x"), b.input("w"), [b.input("s0"), b.input("s1")]
    h = b.mm(b.mm(x, w, name="f1"), w, name="f2")
    _, wait = b.all_to_all(h, splits, "a2a")
    y = b.mm(wait, w, name="f3")
    single = b.op(aten.relu.default, y, name="f4")
    b.phase = "backward"
    g = b.mm(b.mm(single, w, name="b1"), w, name="b2")
    train_graph = b.finish(g)
    regions = cut_regions(train_graph.graph)
    assert [(r.phase, r.kind, r.names) for r in regions] == [
        ("forward", STATIC, ["f1", "f2"]),
        ("forward", STATIC, ["f3", "f4"]),
        ("backward", STATIC, ["b1", "b2"]),
    ]
    assert [r.kind for r in cut_regions(train_graph.graph, min_kernels=3)] == [SMALL, SMALL, SMALL]


def test_captured_regions_partition_the_compute_and_never_hold_a_boundary(graphs):
    for graph in (g.graph for g in graphs.values()):
        regions = cut_regions(graph)
        compute = [n for n in graph.nodes if n.op == "call_function" and not is_boundary(n)]
        assert [n for r in regions for n in r.nodes] == compute  # each once, in graph order
        position = {n: i for i, n in enumerate(graph.nodes)}
        for region in regions:
            first, last = position[region.nodes[0]], position[region.nodes[-1]]
            between = [n for n in graph.nodes if first <= position[n] <= last]
            assert between == region.nodes  # consecutive: nothing else runs inside a region
            assert {node_phase(n) for n in region.nodes} == {region.phase}
            if region.kind == STATIC:
                assert not any(is_dynamic(n) for n in region.nodes)
        # The ragged dispatch reads split sizes on the host: its rows are data-dependent, run as traced.
        assert {STATIC, DYNAMIC} <= {r.kind for r in regions}


def _windows(graph) -> dict[str, tuple[str, list[str]]]:
    """Per collective start: its wait, and the call_function nodes between them, by name."""
    names = [n.name for n in graph.nodes if n.op == "call_function"]
    windows = {}
    for node in graph.nodes:
        if node_role(node) == Role.COMM_START:
            wait = wait_of(node).name
            windows[node.name] = wait, names[names.index(node.name) + 1 : names.index(wait)]
    return windows


def test_programs_of_planned_graphs_keep_order_windows_and_phases(graphs):
    for train_graph in graphs.values():
        program = build_program(train_graph)
        order = program_order(program)
        assert order == [n.name for n in train_graph.graph.nodes if n.op == "call_function"]
        # So every collective starts in the same order and holds the same compute in its window.
        position = {name: i for i, name in enumerate(order)}
        for start, (wait, held) in _windows(train_graph.graph).items():
            assert order[position[start] + 1 : position[wait]] == held
        assert [p.phase for p in program.phases] == ["forward", "backward"]
        forward = {n.name for n in train_graph.graph.nodes if n.meta.get("custom", {}).get("phase") == "forward"}
        assert set(order[: len(forward)]) == forward  # the forward phase holds the forward nodes
        assert program.calls and all(call.region.kind == STATIC for call in program.calls.values())


def test_why_a_ragged_step_cannot_be_graphed_names_the_host_wait(graphs):
    graph = graphs["captured"].graph
    blockers = graph_blockers(graph)
    assert any(b.startswith("host wait host_wait") for b in blockers)
    assert any(b.startswith("copy to the host") for b in blockers)
    assert "CUDA device" in why_not_graphed(graph, torch.device("cpu"))
    assert why_not_graphed(graph, torch.device("cuda", 0)).startswith("the step waits for the host at ")


def test_hand_built_graph_without_host_reads_can_be_graphed_unless_a_collective_spans_the_phases():
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    _, wait = b.all_reduce(b.mm(x, w, name="f1"), "ar")
    assert why_not_graphed(b.finish(wait).graph, torch.device("cuda", 0)) is None
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    start = b.op(c10d.all_reduce.default, b.mm(x, w, name="f1"), "sum", "0", name="ar")
    b.phase = "backward"
    g = b.mm(x, w, name="b1")
    wait = b.op(c10d.wait_tensor.default, start, name="wait_ar")
    assert graph_blockers(b.finish(g, wait).graph) == [
        "collective awaited in the other phase: ar (_c10d_functional.all_reduce.default)"]


@pytest.mark.parametrize("min_kernels", [1, 2, 1000])
def test_program_without_compiled_regions_still_computes_the_graph(min_kernels):
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    h = b.op(aten.relu.default, b.mm(x, w, name="f1"), name="f2")
    b.phase = "backward"
    g = b.mm(h, w, name="b1")
    train_graph = b.finish(g, h)
    program = build_program(train_graph, min_kernels=min_kernels)
    inputs = (torch.randn(3, 4), torch.randn(4, 4))
    assert all(torch.equal(a, e) for a, e in zip(program(*inputs), train_graph.gm(*inputs)))
    assert len(program.calls) == {1: 2, 2: 1, 1000: 0}[min_kernels]


def test_each_chunk_of_the_chunked_loss_is_a_region_of_its_own():
    with fake_process_group(1):
        group = dist.group.WORLD
        cfg = model_config("gpt2_moe_nl1_m32_nh2_sl8_b4", vocab_size=97, gate=GateConfig(kind="switch"),
                           loss_chunk_tokens=8)
        step = TrainStep(build_model(cfg, group), group)
        tokens, targets = BatchSource(batch_size=4, seq_len=8, vocab_size=97).batch(0, 0)
        regions = cut_regions(capture_step(step, tokens, targets).graph)
    units = [{meta.unit(n) for n in r.nodes} for r in regions]
    assert all(len(u) == 1 for u in units)  # no region mixes two chunks, or a chunk with other nodes
    chunk_regions = [r for r, u in zip(regions, units) if next(iter(u)) is not None]
    assert [meta.unit(r.nodes[0]) for r in chunk_regions] == [f"loss_chunk_{i}" for i in range(4)]
    assert all(r.compiled for r in chunk_regions)
