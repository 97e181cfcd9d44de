"""Topological order and cycle reporting for a graph's node list."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from ..errors import GraphStructureError

if TYPE_CHECKING:
    from .graph import Graph, Node


def node_dependencies(node: Node, graph: Graph) -> list[Node]:
    """Producers in ``graph`` that ``node`` needs, explicit inputs and outer-scope reads alike."""
    deps = []
    for value in list(node.inputs) + node.implicit_inputs():
        if value is not None and value.producer is not None and value.producer.graph is graph:
            deps.append(value.producer)
    return deps


def topological_order(graph: Graph) -> list[Node]:
    """Kahn's algorithm, stable: among ready nodes the one earliest in the current order goes first."""
    nodes = list(graph)
    position = {node: i for i, node in enumerate(nodes)}
    indegree = dict.fromkeys(nodes, 0)
    dependents: dict[Node, list[Node]] = {node: [] for node in nodes}
    for node in nodes:
        for dep in node_dependencies(node, graph):
            indegree[node] += 1
            dependents[dep].append(node)
    ready = [position[n] for n in nodes if indegree[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in dependents[node]:
            indegree[user] -= 1
            if indegree[user] == 0:
                heapq.heappush(ready, position[user])
    if len(order) != len(nodes):
        cycle = find_cycle([n for n in nodes if indegree[n] > 0], graph)
        names = " -> ".join(n.label() for n in cycle + cycle[:1])
        raise GraphStructureError(f"the graph has a cycle: {names}", node=cycle[0].label(),
                                  hint="ONNX graphs must be acyclic; check the edges between these nodes")
    return order


def find_cycle(candidates: list[Node], graph: Graph) -> list[Node]:
    """One cycle among ``candidates`` (nodes left over by Kahn's algorithm), in edge order."""
    remaining = set(candidates)
    state: dict[Node, int] = {}  # 1 = on stack, 2 = done
    for start in candidates:
        if start in state:
            continue
        stack = [(start, iter(node_dependencies(start, graph)))]
        path = [start]
        state[start] = 1
        while stack:
            node, deps = stack[-1]
            dep = next((d for d in deps if d in remaining and state.get(d) != 2), None)
            if dep is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(dep) == 1:
                cycle = path[path.index(dep):]
                return list(reversed(cycle))  # dependencies point backwards: reverse to data flow
            else:
                state[dep] = 1
                stack.append((dep, iter(node_dependencies(dep, graph))))
                path.append(dep)
    return candidates[:1]
