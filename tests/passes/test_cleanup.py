"""Cleanup passes: counts, structure and numerics against onnxruntime on the original."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.optimize import optimize
from tests.helpers import parse, run

MESSY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] also) {
    i1 = Identity(x)
    d1 = Dropout(i1)
    one = Constant <value_float = 1.0> ()
    a = Add(d1, one)
    dead1 = Neg(a)
    dead2 = Abs(dead1)
    r = Relu(a)
    y = Identity(r)
    also = Identity(x)
}
"""


def optimized(text: str, passes=None):
    original = parse(text)
    model = graphopt.load(original)
    result = optimize(model, passes)
    return original, result


def feeds(n: int = 3):
    return {"x": np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)}


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_default_pipeline_cleans_and_keeps_interface():
    original, result = optimized(MESSY)
    model = result.model
    assert ops(model) == ["Add", "Relu", "Identity"]  # `also` = Identity(x): an input can't be renamed
    assert [v.name for v in model.graph.outputs] == ["y", "also"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert result.pipeline.stats["remove-identity"].changes == 3
    assert result.pipeline.stats["eliminate-dead-nodes"].changes == 2
    assert result.pipeline.stats["lift-constants"].changes == 1
    assert result.pipeline.converged
    for n in (1, 5):  # dynamic batch still works
        for a, b in zip(run(original, feeds(n)), run(graphopt.to_bytes(model), feeds(n)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_dropout_with_used_mask_or_training_mode_stays():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x, bool t) => (float[4] y, bool[4] m, float[4] z) {
        y, m = Dropout(x)
        z = Dropout(x, , t)
    }
    """
    _, result = optimized(text, ["remove-identity"])
    assert ops(result.model) == ["Dropout", "Dropout"]


def test_constant_training_mode_false_dropout_goes():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] z) {
        r = Constant <value = float {0.5}> ()
        t = Constant <value = bool {0}> ()
        d = Dropout(x, r, t)
        z = Relu(d)
    }
    """
    original, result = optimized(text)
    assert ops(result.model) == ["Relu"]
    x = {"x": np.arange(4, dtype=np.float32) - 2}
    np.testing.assert_array_equal(run(original, x)[0], run(graphopt.to_bytes(result.model), x)[0])


def test_identity_inside_subgraph_reading_outer_value_is_kept_but_others_go():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y) {
        t = Relu(x)
        y = If (c) <
            then_branch = then_g () => (float[3] o1) { o1 = Identity(t) },
            else_branch = else_g () => (float[3] o2) { n = Neg(t)  o2 = Identity(n) }
        >
    }
    """
    original, result = optimized(text)
    if_node = next(n for n in result.model.graph if n.op_type == "If")
    then_g, else_g = (if_node.attr("then_branch"), if_node.attr("else_branch"))
    assert [n.op_type for n in then_g] == ["Identity"]  # o1 must stay a name produced inside the branch
    assert [n.op_type for n in else_g] == ["Neg"] and else_g.outputs[0].name == "o2"
    for c in (True, False):
        inputs = {"x": np.array([-1, 0, 2], np.float32), "c": np.array(c)}
        np.testing.assert_array_equal(run(original, inputs)[0], run(graphopt.to_bytes(result.model), inputs)[0])


def test_identity_passing_a_loop_body_input_to_an_output_goes():
    # bodies bind their inputs and outputs by position: the output may be the input itself
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x, bool keep) => (float[N, 3] y) {
        trips = Constant <value = int64 {3}> ()
        y = Loop (trips, keep, x) <
            body = b (int64 i, bool c, float[N, 3] h) => (bool c_out, float[N, 3] h_out) {
                c_out = Identity(c)
                h_out = Tanh(h)
            }
        >
    }
    """
    original, result = optimized(text)
    (loop,) = [n for n in result.model.graph if n.op_type == "Loop"]
    (body,) = loop.subgraphs()
    assert [n.op_type for n in body] == ["Tanh"]
    assert body.outputs[0] is body.inputs[1]
    for keep in (True, False):
        inputs = {"x": np.array([[-1, 0, 2]], np.float32), "keep": np.array(keep)}
        np.testing.assert_array_equal(run(original, inputs)[0], run(graphopt.to_bytes(result.model), inputs)[0])


def test_identity_passing_a_scan_body_input_to_an_output_stays():
    """onnxruntime's Scan returns zeros for a state whose body output is the body input itself, and shifts the
    scan outputs (skl2onnx's GaussianProcessRegressor and KNeighbors models have such Identity nodes)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] s0, float[3, 2] xs) => (float[2] sf, float[3, 2] ts) {
        sf, ts = Scan <num_scan_inputs = 1, body = b (float[2] s_in, float[2] x) => (float[2] s_out, float[2] t) {
            s_out = Identity(s_in)
            t = Add(s_in, x)
        }> (s0, xs)
    }
    """
    original, result = optimized(text)
    (scan,) = [n for n in result.model.graph if n.op_type == "Scan"]
    (body,) = scan.subgraphs()
    assert body.outputs[0] is not body.inputs[0]
    inputs = {"s0": np.array([1, 2], np.float32), "xs": np.arange(6, dtype=np.float32).reshape(3, 2)}
    for want, got in zip(run(original, inputs), run(graphopt.to_bytes(result.model), inputs), strict=True):
        np.testing.assert_array_equal(want, got)


def test_unused_initializers_removed_but_input_backed_ones_kept():
    text = """
    <ir_version: 4, opset_import: ["" : 9]>
    g (float[2] x, float[2] b) => (float[2] y) <float[2] b = {1, 2}, float[2] unused = {3, 4}> {
        y = Relu(x)
    }
    """
    _, result = optimized(text, ["remove-unused-initializers"])
    assert set(result.model.graph.initializers) == {"b"}


@pytest.mark.parametrize("attr, value", [("value_floats", "[1.0, 2.0]"), ("value_ints", "[1, 2]"),
                                          ("value_int", "3")])
def test_lift_constants_of_every_attribute_form(attr, value):
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {{
        k = Constant <{attr} = {value}> ()
        f = Cast<to = 1>(k)
        y = Add(x, f)
    }}
    """
    original, result = optimized(text, ["lift-constants"])
    assert "Constant" not in ops(result.model) and "k" in result.model.graph.initializers
    x = {"x": np.ones(2, np.float32)}
    np.testing.assert_array_equal(run(original, x)[0], run(graphopt.to_bytes(result.model), x)[0])
