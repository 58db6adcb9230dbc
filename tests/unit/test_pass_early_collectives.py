"""Backward all-to-alls issued early and awaited late: order properties on a hand-built two-part backward."""

from __future__ import annotations

from lancet.passes.early_collectives import early_collectives
from tests.graphs import GraphBuilder


def two_part_backward():
    """Two parts' backward as autograd emits it: each all-to-all awaited right after its start.

        g0 -> [a2a_p0] -> e0 -> [a2a_q0]       g1 -> [a2a_p1] -> e1 -> [a2a_q1]
    """
    b = GraphBuilder()
    grad, w = b.input("grad"), b.input("w")
    splits = [b.input("split0"), b.input("split1")]
    b.phase = "forward"
    fwd = b.mm(grad, w, name="fwd")
    b.phase = "backward"
    g0 = b.mm(fwd, w, name="g0")
    g1 = b.mm(fwd, w, name="g1")
    _, wait_p1 = b.all_to_all(g1, splits, "a2a_p1")
    e1 = b.mm(wait_p1, w, name="e1")
    _, wait_q1 = b.all_to_all(e1, splits, "a2a_q1")
    _, wait_p0 = b.all_to_all(g0, splits, "a2a_p0")
    e0 = b.mm(wait_p0, w, name="e0")
    _, wait_q0 = b.all_to_all(e0, splits, "a2a_q0")
    out = b.op(b.mm(wait_q0, w).target, wait_q1, w, name="out")
    return b.finish(out, e0)


def names(graph):
    return [n.name for n in graph.nodes if n.op == "call_function"]


def test_starts_move_up_and_waits_down():
    tg = two_part_backward()
    moved = early_collectives(tg.graph)
    order = names(tg.graph)
    pos = {n: i for i, n in enumerate(order)}
    # each start right after its input (or after a start placed there before it)
    for start, source in (("a2a_p0", "g0"), ("a2a_p1", "g1"), ("a2a_q1", "e1"), ("a2a_q0", "e0")):
        between = order[pos[source] + 1 : pos[start]]
        assert all(n.startswith("a2a_") for n in between), (start, between)
    # so part 0's all-to-all is in flight while part 1 computes e1
    assert pos["a2a_p0"] < pos["e1"] < pos["wait_a2a_p0"]
    # each wait sits right before its first user
    for wait, user in (("wait_a2a_p1", "e1"), ("wait_a2a_p0", "e0"), ("wait_a2a_q1", "out"), ("wait_a2a_q0", "out")):
        assert pos[wait] < pos[user]
    assert pos["wait_a2a_p1"] == pos["e1"] - 1
    assert moved > 0
    tg.graph.lint()


def test_forward_collectives_are_not_touched_and_a_second_run_changes_nothing():
    b = GraphBuilder()
    x, w = b.input("x"), b.input("w")
    splits = [b.input("split0"), b.input("split1")]
    h = b.mm(x, w, name="h")
    _, wait = b.all_to_all(h, splits, "a2a_fwd")
    y = b.mm(wait, w, name="y")
    tg = b.finish(y)
    before = names(tg.graph)
    assert early_collectives(tg.graph) == 0 and names(tg.graph) == before

    tg = two_part_backward()
    early_collectives(tg.graph)
    once = names(tg.graph)
    assert early_collectives(tg.graph) == 0 and names(tg.graph) == once
