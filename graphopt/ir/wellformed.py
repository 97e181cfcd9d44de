"""IR well-formedness check (torch.fx's Graph.lint, TVM's well-formed check).

Passes run it after every change in tests and under ``--verify-each``: it
catches a pass that broke the use-def lists, left a dangling reference,
created a cycle or reused a name, at the pass that did it.
"""

from __future__ import annotations

from ..errors import GraphStructureError
from .graph import Graph, Node, Value
from .model import Model


def verify(target: Model | Graph) -> None:
    """Raise GraphStructureError describing the first problem found."""
    roots = [target.graph] + [f.graph for f in target.functions] if isinstance(target, Model) else [target]
    for root in roots:  # each function body is its own namespace
        names: dict[str, Value] = {}
        for graph in root.walk_graphs():
            _check_graph(graph, names)


def _check_graph(graph: Graph, names: dict[str, Value]) -> None:
    visible = _outer_values(graph)
    for value in graph.values():
        _check_name(value, names)
        if value.graph is not graph:
            raise GraphStructureError(f"value {value.name!r} is listed in graph {graph.name!r} "
                                      "but records another owner")
        visible.add(id(value))
    for value in graph.initializers.values():
        if value.const is None:
            raise GraphStructureError(f"initializer {value.name!r} has no tensor")
    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    count = 0
    for node in graph:
        count += 1
        _check_node(node, graph, defined, visible)
        defined.update(id(out) for out in node.outputs)
    if count != len(graph):
        raise GraphStructureError(f"graph {graph.name!r}: node list length {count} != recorded {len(graph)}")
    for out in graph.outputs:
        if id(out) not in visible:
            raise GraphStructureError(f"graph {graph.name!r}: output {out.name!r} is not defined in scope")


def _check_node(node: Node, graph: Graph, defined: set[int], visible: set[int]) -> None:
    label = node.label()
    if node.graph is not graph:
        raise GraphStructureError("node is linked into a graph it does not record as its owner", node=label)
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        if (node, index) not in value._uses:
            raise GraphStructureError(f"input {index} ({value.name!r}) does not list this node as a use",
                                      node=label)
        local = value.graph is graph
        if local and id(value) not in defined:
            why = "is used before it is produced (not topological)"
            if id(value) not in visible:
                why = "is not defined"
            raise GraphStructureError(f"input {value.name!r} {why}", node=label)
        if not local and id(value) not in visible:
            raise GraphStructureError(
                f"input {value.name!r} is not defined in this graph or any enclosing one", node=label)
    for index, out in enumerate(node.outputs):
        if out.producer is not node or out.index != index:
            raise GraphStructureError(f"output {out.name!r} records the wrong producer", node=label)
        for user, slot in out.uses():
            if user.inputs[slot] is not out:
                raise GraphStructureError(f"value {out.name!r} lists a stale use by {user.label()}",
                                          node=label)
            if user.graph is None:
                raise GraphStructureError(f"value {out.name!r} is used by an erased node {user.label()}",
                                          node=label)
    for sub in node.subgraphs():
        if sub.parent is not node:
            raise GraphStructureError(f"subgraph {sub.name!r} does not record its parent node", node=label)


def _check_name(value: Value, names: dict[str, Value]) -> None:
    if not value.name:
        return
    other = names.setdefault(value.name, value)
    if other is not value:
        raise GraphStructureError(f"two values share the name {value.name!r}")


def _outer_values(graph: Graph) -> set[int]:
    """Values of every enclosing graph (what a subgraph may read by outer-scope reference)."""
    visible: set[int] = set()
    node = graph.parent
    while node is not None and node.graph is not None:
        visible.update(id(v) for v in node.graph.values())
        node = node.graph.parent
    return visible
