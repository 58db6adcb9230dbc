"""Apply a new node order to a graph (node order is the schedule)."""

from __future__ import annotations

import heapq

from torch import fx


class OrderError(ValueError):
    """A proposed order is not a permutation of the graph's nodes or breaks a dependency."""


def check_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    nodes = list(graph.nodes)
    if len(order) != len(nodes) or set(order) != set(nodes):
        raise OrderError("new order is not a permutation of the graph's nodes")
    seen: set[fx.Node] = set()
    for node in order:
        for producer in node.all_input_nodes:
            if producer not in seen:
                raise OrderError(f"{node.name} would run before its input {producer.name}")
        seen.add(node)


def apply_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    """Re-link ``graph``'s nodes in ``order`` after checking it is a valid topological order."""
    check_order(graph, order)
    placeholders = [n for n in order if n.op == "placeholder"]
    if order[: len(placeholders)] != placeholders:
        raise OrderError("placeholders must stay first")
    for previous, node in zip(order, order[1:]):
        if previous.next is not node:
            previous.append(node)
    graph.lint()


def stable_topological_order(graph: fx.Graph) -> list[fx.Node]:
    """The graph's nodes in their current order, except that no node precedes one of its inputs."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in graph.nodes}
    ready = [(position[n], n.name, n) for n in graph.nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (position[user], user.name, user))
    return order
