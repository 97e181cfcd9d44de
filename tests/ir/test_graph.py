"""Use-def lists, mutation API, ordering and the well-formedness check of the IR."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.errors import GraphStructureError
from graphopt.ir import ArrayTensor, Graph, Node, TensorType, Value, verify
from tests.helpers import parse

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    a = Relu(x)
    b = Neg(a)
    c = Add(a, b)
    y = Sigmoid(c)
}
"""


def load(text: str = CHAIN) -> graphopt.Model:
    return graphopt.load(parse(text))


def node_named(graph: Graph, op: str) -> Node:
    return next(n for n in graph if n.op_type == op)


def test_uses_follow_set_input():
    graph = load().graph
    relu, neg, add = node_named(graph, "Relu"), node_named(graph, "Neg"), node_named(graph, "Add")
    a = relu.outputs[0]
    assert a.uses() == [(neg, 0), (add, 0)]
    add.set_input(0, neg.outputs[0])
    assert a.uses() == [(neg, 0)]
    assert (add, 0) in neg.outputs[0].uses() and (add, 1) in neg.outputs[0].uses()
    verify(graph)


def test_replace_all_uses_with_leaves_graph_outputs_unless_asked():
    model = load()
    graph = model.graph
    sigmoid = node_named(graph, "Sigmoid")
    x = graph.inputs[0]
    y = sigmoid.outputs[0]
    assert y.replace_all_uses_with(x) == 0
    assert graph.outputs[0] is y
    assert y.replace_all_uses_with(x, include_graph_outputs=True) == 1
    assert graph.outputs[0] is x


def test_erase_refuses_node_with_users_and_names_them():
    graph = load().graph
    with pytest.raises(GraphStructureError, match="still used by .*Neg"):
        graph.erase(node_named(graph, "Relu"))


def test_erase_and_insert_keep_list_and_uses_consistent():
    graph = load().graph
    add, neg = node_named(graph, "Add"), node_named(graph, "Neg")
    relu_out = node_named(graph, "Relu").outputs[0]
    add.set_input(1, relu_out)
    graph.erase(neg)
    assert [n.op_type for n in graph] == ["Relu", "Add", "Sigmoid"]
    assert len(graph) == 3
    tanh = Node("Tanh", [relu_out])
    tanh.outputs[0].name = "t"
    graph.insert_after(node_named(graph, "Relu"), tanh)
    add.set_input(1, tanh.outputs[0])
    assert [n.op_type for n in graph] == ["Relu", "Tanh", "Add", "Sigmoid"]
    verify(graph)


def test_iteration_survives_erasing_the_current_node():
    graph = load().graph
    node_named(graph, "Add").set_input(1, graph.inputs[0])
    seen = []
    for node in graph:
        seen.append(node.op_type)
        if node.op_type == "Neg":
            graph.erase(node)
    assert seen == ["Relu", "Neg", "Add", "Sigmoid"]


def test_toposort_is_stable_and_fixes_order():
    x = Value("x", TensorType(1, (3,)))
    late = Node("Relu", [x], name="late")
    consumer = Node("Neg", [late.outputs[0]], name="consumer")
    free = Node("Abs", [x], name="free")
    graph = Graph("g", inputs=[x], nodes=[consumer, free, late], outputs=[consumer.outputs[0]])
    for i, node in enumerate(graph):
        node.outputs[0].name = f"v{i}"
    graph.toposort()
    assert [n.name for n in graph] == ["free", "late", "consumer"]
    verify(graph)


def test_cycle_is_reported_with_node_names():
    graph = load().graph
    relu, add = node_named(graph, "Relu"), node_named(graph, "Add")
    relu.name, add.name = "first", "third"
    node_named(graph, "Neg").name = "second"
    relu.set_input(0, add.outputs[0])  # a -> b -> c -> a
    with pytest.raises(GraphStructureError, match="cycle: ") as err:
        graph.toposort()
    cycle = str(err.value).split("cycle: ")[1].split(" (node")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"first", "third"}  # Relu reads Add, Add reads Relu


def test_verify_detects_use_list_drift_and_order_problems():
    graph = load().graph
    neg = node_named(graph, "Neg")
    neg.inputs[0]._uses.clear()  # simulate a pass that bypassed the API
    with pytest.raises(GraphStructureError, match="does not list this node"):
        verify(graph)

    graph = load().graph
    relu, neg = node_named(graph, "Relu"), node_named(graph, "Neg")
    # put Neg before Relu in the list
    neg._prev._next, neg._next._prev = neg._next, neg._prev
    graph._len -= 1
    neg.graph = None
    graph.insert_before(relu, neg)
    with pytest.raises(GraphStructureError, match="before it is produced"):
        verify(graph)


def test_fresh_names_are_unique_across_subgraphs():
    model = graphopt.load(parse(IF_MODEL))
    names = {model.graph.fresh_name("t") for _ in range(5)}
    assert len(names) == 5
    taken = {v.name for g in model.graph.walk_graphs() for v in g.values()}
    assert not names & taken
    assert model.graph.fresh_name("x") != "x"


IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, bool c) => (float[3] y) {
    k = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
    t = Mul(x, k)
    y = If (c) <
        then_branch = then_g () => (float[3] out_t) { out_t = Add(t, k) },
        else_branch = else_g () => (float[3] out_e) { out_e = Sub(t, x) }
    >
}
"""


def test_outer_scope_uses_are_recorded_and_dropped_with_the_if_node():
    model = graphopt.load(parse(IF_MODEL))
    graph = model.graph
    t = node_named(graph, "Mul").outputs[0]
    users = {n.op_type for n in t.users()}
    assert users == {"Add", "Sub"}  # the nodes inside the branches
    if_node = node_named(graph, "If")
    assert {v.name for v in if_node.implicit_inputs()} == {"t", "k", "x"}
    if_node.outputs[0].replace_all_uses_with(graph.inputs[0], include_graph_outputs=True)
    graph.erase(if_node)
    assert not t.has_uses()
    verify(model)


def test_replace_all_uses_reaches_into_subgraphs():
    model = graphopt.load(parse(IF_MODEL))
    graph = model.graph
    t = node_named(graph, "Mul").outputs[0]
    x = graph.inputs[0]
    t.replace_all_uses_with(x)
    add = next(n for n in graph.walk_nodes() if n.op_type == "Add")
    assert add.inputs[0] is x
    verify(model)


def test_add_initializer_from_tensor():
    graph = load().graph
    value = graph.add_initializer(ArrayTensor(np.ones((2, 2), np.float32)), name="ones")
    assert value.is_initializer() and value.type == TensorType(1, (2, 2))
    with pytest.raises(GraphStructureError):
        graph.add_initializer(Value("ones", const=ArrayTensor(np.zeros(1, np.float32))))
