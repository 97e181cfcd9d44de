"""inline-constant-if: an If with a constant condition becomes the branch it always takes.

Exports branch on flags that are constant once the model is frozen (a config
switch, a shape check that folding resolved). The taken branch's nodes and
initializers move into the enclosing graph in front of the If; names are
model-global already, so nothing is renamed, and the branch's reads of outer
values become ordinary local reads because values are shared objects. Each
If output keeps its name (it may be a graph output or read by name in a
subgraph): the branch value that computes it takes the name, or, where that
value cannot be renamed (an outer value, an initializer, a value returned
twice), an Identity produces it.

A Loop that runs zero times (constant trip count 0, or constant false
condition) is also replaced: its loop-carried outputs are the initial values,
provided nobody reads its scan outputs.
"""

from __future__ import annotations

import logging

import numpy as np

from graphopt.ir import Graph, Model, Node, Value
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

from .evaluate import ConstantScope

log = logging.getLogger(__name__)


@register_pass
class InlineConstantIf(Pass):
    name = "inline-constant-if"
    description = "Replace an If with a constant condition by its taken branch; drop Loops that run zero times"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = ConstantScope(model)
        changes = 0
        function_graphs = {id(g) for f in model.functions for g in f.graph.walk_graphs()}
        for graph in list(model.graphs()):
            for node in graph:
                if node.domain not in ("", "ai.onnx") or node.graph is None:
                    continue
                if node.op_type == "If":
                    changes += _inline_if(node, scope, allow_initializers=id(graph) not in function_graphs)
                elif node.op_type == "Loop":
                    changes += _drop_zero_trip_loop(node, scope)
        return PassResult(changes)


def _scalar(value: Value | None, scope: ConstantScope) -> np.ndarray | None:
    tensor = scope.constant_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return np.asarray(tensor.numpy()).reshape(-1)[0]


def _inline_if(node: Node, scope: ConstantScope, *, allow_initializers: bool) -> int:
    cond = _scalar(node.inputs[0] if node.inputs else None, scope)
    if cond is None:
        return 0
    branch: Graph = node.attr("then_branch" if bool(cond) else "else_branch")
    if branch is None or len(branch.outputs) != len(node.outputs):
        return 0
    if branch.initializers and not allow_initializers:
        return 0  # a function body cannot hold initializers
    graph = node.graph
    for name in list(branch.initializers):
        value = branch.initializers.pop(name)
        graph.add_initializer(value)
    for inner in list(branch):
        move_node(inner, branch, graph, before=node)
    renamed: set[int] = set()
    for out, result in zip(node.outputs, branch.outputs, strict=True):
        _take_over(out, result, graph, node, renamed, scope)
    branch.outputs.clear()
    graph.erase(node)
    return 1


def _take_over(out: Value, result: Value, graph: Graph, anchor: Node, renamed: set[int],
               scope: ConstantScope) -> None:
    """Make ``out``'s readers (and the graph output slot, if any) read the branch's ``result``."""
    movable = (result.producer is not None and result.producer.graph is graph and id(result) not in renamed
               and not any(v is result for v in graph.outputs))  # (once per If output: no hot loop)
    if movable:
        renamed.add(id(result))
        out.replace_all_uses_with(result, include_graph_outputs=True)
        result.name = out.name
        if scope.is_output(out) or result.type is None:
            result.type = out.type  # a graph output keeps its declared type
        result.doc_string = result.doc_string or out.doc_string
        if scope.is_output(out):
            scope.graph_outputs.add(id(result))
        return
    identity = Node("Identity", [result], outputs=[out.name])
    graph.insert_before(anchor, identity)
    identity.outputs[0].type = out.type or result.type
    out.replace_all_uses_with(identity.outputs[0], include_graph_outputs=True)
    if scope.is_output(out):
        scope.graph_outputs.add(id(identity.outputs[0]))


def _drop_zero_trip_loop(node: Node, scope: ConstantScope) -> int:
    """Loop(M, cond, v...) that never iterates: its final values are the initial ones."""
    trip = _scalar(node.inputs[0] if node.inputs else None, scope)
    cond = _scalar(node.inputs[1] if len(node.inputs) > 1 else None, scope)
    if not (trip is not None and int(trip) <= 0 or cond is not None and not bool(cond)):
        return 0
    carried = list(node.inputs[2:])
    scans = node.outputs[len(carried):]
    if any(v.has_uses() or scope.is_output(v) for v in scans) or any(v is None for v in carried):
        return 0
    graph = node.graph
    for out, initial in zip(node.outputs[: len(carried)], carried, strict=True):
        identity = Node("Identity", [initial], outputs=[out.name])
        graph.insert_before(node, identity)
        identity.outputs[0].type = out.type or initial.type
        out.replace_all_uses_with(identity.outputs[0], include_graph_outputs=True)
        if scope.is_output(out):
            scope.graph_outputs.add(id(identity.outputs[0]))
    graph.erase(node)
    return 1


def move_node(node: Node, source: Graph, dest: Graph, *, before: Node) -> None:
    """Move ``node`` from ``source`` into ``dest`` in front of ``before``, keeping its uses and outputs.

    The IR has no "unlink without detaching" yet (``Graph.erase`` drops the
    node's uses), so this edits the node list directly; a core
    ``Graph.remove(node)`` that only unlinks would replace it.
    """
    if node.graph is not source:
        raise ValueError(f"{node!r} is not in {source!r}")
    node._prev._next, node._next._prev = node._next, node._prev
    node._prev = node._next = None
    node.graph = None
    source._len -= 1
    dest.insert_before(before, node)
