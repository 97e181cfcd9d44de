"""The rewrite engine: patterns, conditions, replacements, the driver, explain, and rule errors."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.ir import verify
from graphopt.rewrite import RULE_METADATA_KEY, Rule, RuleError, RuleSet
from tests.helpers import parse, run


def load(text: str):
    return graphopt.load(parse(text))


def ops(graph) -> list[str]:
    return [n.op_type for n in graph]


SWISH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x, float[4] z) => (float[4] y, float[4] w) {
    s = Sigmoid(x)
    y = Mul(x, s)
    t = Sigmoid(z)
    w = Mul(t, z)
}
"""


def swish_rule(**kw) -> Rule:
    return Rule("swish", lambda op, x: op.Mul(x, op.Sigmoid(x), _commute=True),
                lambda op, x: op.Swish(x, _domain="test.ops"), **kw)


def test_commutative_match_both_orders_and_interface_kept():
    model = load(SWISH)
    counts = RuleSet([swish_rule()]).apply(model)
    assert counts == {"swish": 2}
    assert ops(model.graph) == ["Swish", "Swish"]
    assert [v.name for v in model.graph.outputs] == ["y", "w"]
    assert all(n.metadata[RULE_METADATA_KEY] == "swish" for n in model.graph)
    assert model.opset_imports["test.ops"] == 1
    verify(model)


def test_one_use_constraint_and_explain():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y, float[4] s) {
        s = Sigmoid(x)
        y = Mul(x, s)
    }
    """)
    rules = RuleSet([swish_rule()])
    assert rules.apply(model) == {}
    (why,) = rules.explain(model, "swish")
    assert not why.matches and "graph output" in why.reason


def test_explain_names_the_first_failed_constraint():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, float[4] z) => (float[4] a, float[4] b, float[4] c) {
        r = Relu(x)
        a = Mul(x, r)
        t = Sigmoid(z)
        b = Mul(x, t)
        c = Mul(x, x)
    }
    """)
    reasons = [e.reason for e in RuleSet([swish_rule()]).explain(model, "swish")]
    assert "expected op Sigmoid, got Relu" in reasons[0]
    assert "x is 'x' elsewhere in the pattern but 'z' here" in reasons[1]
    assert "expected the output of Sigmoid, got a graph input or outer value 'x'" in reasons[2]


def test_attribute_constraints_consts_and_conditions():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[3, 2] y, float[2, 3] z) {
        t1 = Transpose <perm = [1, 0]> (x)
        k = Constant <value = float[1] {0.0}> ()
        y = Add(t1, k)
        one = Constant <value = float[1] {2.0}> ()
        z = Add(x, one)
    }
    """)
    graphopt.optimize(model, ["lift-constants"])

    def target(op, x):
        return op.Add(x, op.const("zero", where=lambda a: not a.any()), _commute=True)

    def only_transposes(ctx, x):
        return True if x.producer is not None and x.producer.op_type == "Transpose" else "x is not a Transpose"

    rule = Rule("add-zero", target, lambda op, x: x, only_transposes)
    explained = {e.node: e.reason for e in RuleSet([rule]).explain(model, "add-zero")}
    assert any("fails the pattern's predicate" in (r or "") for r in explained.values())
    counts = RuleSet([rule]).apply(model)
    assert counts == {"add-zero": 1}
    assert ops(model.graph) == ["Transpose", "Identity", "Add"]  # y must stay a node output named y
    assert model.graph.outputs[0].name == "y"
    verify(model)


def test_attribute_predicate_and_optional_input():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] a, float[3, 4] b, float[4] c) => (float[2, 4] y, float[2, 4] z) {
        y = Gemm <alpha = 1.0> (a, b)
        z = Gemm <alpha = 1.0> (a, b, c)
    }
    """
    model = load(text)
    seen = []

    def target(op, a, b, c):
        return op.Gemm(a, b, op.opt(c), alpha=lambda v: v in (None, 1.0))

    def replacement(op, a, b, c):
        seen.append(c is None)
        product = op.MatMul(a, b)
        return product if c is None else op.Add(product, c)

    counts = RuleSet([Rule("gemm-to-matmul", target, replacement)]).apply(model)
    assert counts == {"gemm-to-matmul": 2} and sorted(seen) == [False, True]
    feeds = {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 4), np.float32), "c": np.arange(4, dtype=np.float32)}
    for x, y in zip(run(parse(text), feeds), run(graphopt.to_bytes(model), feeds), strict=True):
        np.testing.assert_array_equal(x, y)


def test_rules_apply_inside_subgraphs_and_to_a_fixed_point():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y) {
        y = If (c) <
            then_branch = t () => (float[3] o) { a = Relu(x)  b = Relu(a)  o = Relu(b) },
            else_branch = e () => (float[3] p) { p = Neg(x) }
        >
    }
    """)
    rule = Rule("relu-relu", lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))
    counts = RuleSet([rule]).apply(model)
    assert counts == {"relu-relu": 2}
    then_branch = model.graph.nodes[0].attr("then_branch")
    assert ops(then_branch) == ["Relu"] and then_branch.outputs[0].name == "o"
    verify(model)


def test_rule_errors_name_the_rule_and_leave_the_graph_alone():
    model = load(SWISH)
    before = ops(model.graph)
    two = Rule("bad-arity", lambda op, x: op.Sigmoid(x), lambda op, x: (op.Relu(x), op.Relu(x)))
    with pytest.raises(RuleError, match="'bad-arity'.*2 value"):
        RuleSet([two]).apply(model)
    dangling = Rule("bad-input", lambda op, x: op.Mul(x, op.Sigmoid(x)),
                    lambda op, x, ctx: op.Relu(ctx.match.nodes[1].outputs[0]))
    with pytest.raises(RuleError, match="'bad-input'.*dangling"):
        RuleSet([dangling]).apply(model)
    not_value = Rule("bad-value", lambda op, x: op.Sigmoid(x), lambda op, x: op.Relu(3.0))
    with pytest.raises(RuleError, match="'bad-value'.*not a Value"):
        RuleSet([not_value]).apply(model)
    assert ops(model.graph) == before
    verify(model)


def test_numerics_of_a_rewrite_match_onnxruntime():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[8] x) => (float[8] y) {
        c = Constant <value = float {4.0}> ()
        y = Div(x, c)
    }
    """
    model = load(text)
    graphopt.optimize(model, ["lift-constants"])

    def replacement(op, x, c):
        return op.Mul(x, op.const(np.float32(1.0) / c.const.numpy()))

    RuleSet([Rule("div-to-mul", lambda op, x: op.Div(x, op.const("c")), replacement)]).apply(model)
    assert ops(model.graph) == ["Mul"]
    x = {"x": np.linspace(-3, 3, 8, dtype=np.float32)}
    np.testing.assert_array_equal(run(parse(text), x)[0], run(graphopt.to_bytes(model), x)[0])


def test_rule_sets_compose_and_reject_duplicate_names():
    a = RuleSet([swish_rule()])
    b = RuleSet([Rule("relu-relu", lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))])
    assert [r.name for r in a + b] == ["swish", "relu-relu"]
    with pytest.raises(ValueError, match="duplicate"):
        a + a


def test_a_replacement_node_keeps_the_name_of_the_matched_node_it_stands_for():
    """One new node of an erased matched node's op type takes its name (a Conv that absorbed a BatchNorm is
    still the layer users exclude or profile by name); with two candidates, or none, it gets a fresh one."""
    from onnx import TensorProto, helper

    def model_with(nodes):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
        return graphopt.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    abs_of_neg = Rule("abs-neg", lambda op, x: op.Abs(op.Neg(x)), lambda op, x: op.Abs(x))
    model = model_with([helper.make_node("Neg", ["x"], ["n"], name="negate"),
                        helper.make_node("Abs", ["n"], ["y"], name="magnitude")])
    RuleSet([abs_of_neg]).apply(model)
    assert [(n.op_type, n.name) for n in model.graph] == [("Abs", "magnitude")]

    relu_relu = Rule("relu-relu", lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))
    model = model_with([helper.make_node("Relu", ["x"], ["r"], name="first"),
                        helper.make_node("Relu", ["r"], ["y"], name="second")])
    RuleSet([relu_relu]).apply(model)
    assert [n.name for n in model.graph] == ["relu-relu/Relu_node"]  # two Relus went: neither name is taken

    to_relu = Rule("sigmoid-to-relu", lambda op, x: op.Sigmoid(x), lambda op, x: op.Relu(x))
    model = model_with([helper.make_node("Sigmoid", ["x"], ["y"], name="gate")])
    RuleSet([to_relu]).apply(model)
    assert [n.name for n in model.graph] == ["sigmoid-to-relu/Relu_node"]
    verify(model)
