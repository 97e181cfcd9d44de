"""Rewriter features the fusions asked for: typed replacement outputs, conditions that hand extra bindings
to the replacement, explain reporting the nearest miss, and patterns exposing an inner value."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.ir import TensorType, verify
from graphopt.rewrite import Rule, RuleError, RuleSet
from tests.helpers import parse, run

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 8] x, float[2, 8] r) => (float[2, 8] y) {
    s = Add(x, r)
    y = Relu(s)
}
"""


def load(text: str):
    return graphopt.load(parse(text))


def _typed_s(text: str = RESIDUAL):
    model = load(text)
    (s,) = [v for v in model.graph.values() if v.name == "s"]
    s.type = TensorType(1, (2, 8))
    return model


def _rules(add_to_sum) -> RuleSet:
    """Add -> Sum, then Relu(Sum) -> Max(Sum, 0) where the Sum's shape is known (as shape-aware fusions
    read shapes in their conditions)."""

    def shape_known(ctx, total):
        return True if total.outputs[0].shape == (2, 8) else "the shape of the sum is unknown"

    relu_of_sum = Rule("relu-of-sum", lambda op, a, b: op.Relu(op.Sum(a, b, _name="total")),
                       lambda op, a, b: op.Max(op.Sum(a, b), op.const(np.float32(0))), shape_known)
    return RuleSet([Rule("add-to-sum", lambda op, a, b: op.Add(a, b), add_to_sum), relu_of_sum])


def test_typed_outputs_let_the_next_rule_read_shapes_without_inference():
    untyped = _rules(lambda op, a, b: op.Sum(a, b))
    model = _typed_s()
    assert untyped.apply(model) == {"add-to-sum": 1}
    (why,) = untyped.explain(model, "relu-of-sum")
    assert why.reason == "condition: the shape of the sum is unknown"

    typed = _rules(lambda op, a, b, ctx: op.Sum(a, b, _type=ctx.root.outputs[0]))
    model = _typed_s()
    assert typed.apply(model) == {"add-to-sum": 1, "relu-of-sum": 1}
    assert [n.op_type for n in model.graph] == ["Sum", "Max"]
    verify(model)
    x, r = np.random.default_rng(0).standard_normal((2, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(graphopt.to_bytes(model), {"x": x, "r": r})[0], np.maximum(x + r, 0), rtol=1e-6)


def test_typed_outputs_take_a_type_or_a_value_and_check_the_count():
    model = load(RESIDUAL)

    def split(op, a, b):
        return op.Split(op.Concat(a, b, axis=1), _outputs=2, axis=1, _type=[a, TensorType(1, (2, 8))])[0]

    rules = RuleSet([Rule("roundtrip", lambda op, a, b: op.Add(a, b), split)])
    rules.apply(model)
    (node,) = [n for n in model.graph if n.op_type == "Split"]
    assert [o.type for o in node.outputs] == [TensorType(1, (2, 8))] * 2

    for bad, message in (([TensorType(1, (2, 8))], "one type per output"), ("float", "not a type or a Value")):
        model = load(RESIDUAL)

        with pytest.raises(RuleError, match=rf"rule 'bad-type': _type of Add .*{message}"):
            RuleSet([Rule("bad-type", lambda op, a, b: op.Add(a, b), _typed_as(bad))]).apply(model)
        assert [n.op_type for n in model.graph] == ["Add", "Relu"]  # untouched
        verify(model)


def _typed_as(type_):
    """A replacement Add typed with ``type_`` (a closure: rule functions receive bindings by parameter name)."""
    return lambda op, a, b: op.Add(a, b, _type=type_)


def _returning(verdict):
    return lambda ctx: verdict


def test_condition_hands_extra_bindings_to_the_replacement():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
        c = Constant <value = float[1] {4.0}> ()
        y = Div(x, c)
    }
    """)
    graphopt.optimize(model, ["lift-constants"])
    seen = []

    def condition(ctx, x, c):
        value = float(c.const.numpy().reshape(-1)[0])
        return "division by zero" if value == 0 else {"inverse": 1.0 / value}

    def replacement(op, x, inverse: float):
        seen.append(inverse)
        return op.Mul(x, op.const(np.array([inverse], np.float32)))

    rule = Rule("div-to-mul", lambda op, x: op.Div(x, op.const("c")), replacement, condition)
    x = np.arange(4, dtype=np.float32)
    assert RuleSet([rule]).apply(model) == {"div-to-mul": 1}
    assert seen == [0.25]
    np.testing.assert_allclose(run(graphopt.to_bytes(model), {"x": x})[0], x / 4)


def test_condition_bindings_must_not_shadow_the_pattern_and_must_be_well_formed():
    for verdict, message in (({"x": 1}, r"bindings \['x'\] are already bound"), (3, "the condition returned 3")):
        model = load(RESIDUAL)
        rule = Rule("bad-condition", lambda op, a, x: op.Add(a, x), lambda op, a, x: op.Sum(a, x),
                    _returning(verdict))
        with pytest.raises(RuleError, match=rf"rule 'bad-condition': .*{message}"):
            RuleSet([rule]).apply(model)
        assert [n.op_type for n in model.graph] == ["Add", "Relu"]


def test_explain_reports_the_nearest_miss_of_a_commutative_pattern():
    model = load("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, float[3, 4] w, float[4] z) => (float[2, 4] y) {
        m = MatMul(x, w)
        y = Add(m, z)
    }
    """)
    # written bias-first: the first order tried fails at once (m is no constant); the second matches the
    # MatMul and then fails on the bias, which is the useful answer
    rule = Rule("matmul-bias", lambda op, x, w: op.Add(op.const("b"), op.MatMul(x, w), _commute=True),
                lambda op, x, w, b: op.Gemm(x, w, b))
    (why,) = RuleSet([rule]).explain(model, "matmul-bias")
    assert why.reason == "input 1 of <unnamed Add -> y>: expected a constant, got 'z' (computed or a graph input)"


EXPOSED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 8] x) => (float[2, 8] y, int64[1] n) {
    h = Relu(x)
    s = Shape <end = 1> (h)
    n = Add(s, s)
    y = Neg(h)
}
"""


def _neg_relu(expose: bool) -> Rule:
    """Neg(Relu(x)) -> Min(Neg(x), 0); exposing the Relu hands its other readers a Max(x, 0)."""

    def target(op, x):
        hidden = op.Relu(x)
        return (op.Neg(hidden), hidden) if expose else op.Neg(hidden)

    def replacement(op, x):
        zero = op.const(np.float32(0))
        negated = op.Min(op.Neg(x), zero)
        return (negated, op.Max(x, zero)) if expose else negated

    return Rule("neg-relu", target, replacement)


def test_an_exposed_inner_value_hands_its_other_readers_the_replacement():
    model = load(EXPOSED)
    (why,) = RuleSet([_neg_relu(expose=False)]).explain(model, "neg-relu")
    assert "is also used by" in why.reason and "Shape" in why.reason

    assert RuleSet([_neg_relu(expose=True)]).apply(model) == {"neg-relu": 1}
    (shape,) = [n for n in model.graph if n.op_type == "Shape"]
    assert shape.inputs[0].producer.op_type == "Max"  # its reader moved; the Relu is gone
    assert "Relu" not in [n.op_type for n in model.graph]
    verify(model)  # the Shape sat before the root, where the new nodes went in: the graph was reordered
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    y, n = run(graphopt.to_bytes(model), {"x": x})
    np.testing.assert_array_equal(y, -np.maximum(x, 0))
    np.testing.assert_array_equal(n, [4])


def test_a_pattern_can_expose_only_values_computed_inside_it():
    with pytest.raises(TypeError, match="is not computed inside the pattern"):
        Rule("stray", lambda op, x, y: (op.Neg(x), op.Relu(y)), lambda op, x, y: (x, y))
