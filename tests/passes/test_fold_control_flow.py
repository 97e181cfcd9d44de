"""inline-constant-if (and zero-trip Loop removal): structure, names, outer-scope reads, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
import graphopt.passes.simplify  # noqa: F401 - registers the passes
from graphopt.optimize import optimize
from tests.helpers import parse, run

PIPELINE = ["lift-constants", "inline-constant-if", "fold-constants", "eliminate-dead-nodes",
            "remove-unused-initializers"]


def optimized(original: onnx.ModelProto, passes=None):
    model = graphopt.load(original)
    result = optimize(model, passes or PIPELINE)
    return model, result


def ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def assert_same(original, model, feeds) -> None:
    for expected, got in zip(run(original, feeds), run(graphopt.to_bytes(model), feeds), strict=True):
        np.testing.assert_array_equal(expected, got)


def if_model(flag: str, cond_decl: str = "") -> onnx.ModelProto:
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x{cond_decl}) => (float[N, 3] y, float[N, 3] z) {{
        t = Relu(x)
        {flag}
        y, z = If (c) <
            then_branch = tb () => (float[N, 3] a, float[N, 3] b) {{
                a = Neg(t)
                b = Abs(a)
            }},
            else_branch = eb () => (float[N, 3] a2, float[N, 3] b2) {{
                a2 = Exp(t)
                b2 = Identity(t)
            }}
        >
    }}
    """)


@pytest.mark.parametrize("value, expected", [("1", ["Relu", "Neg", "Abs"]), ("0", ["Relu", "Exp", "Identity"])])
def test_constant_condition_inlines_the_taken_branch_under_the_if_output_names(value, expected):
    original = if_model(f"c = Constant <value = bool {{{value}}}> ()")
    model, result = optimized(original)
    assert ops(model.graph) == expected
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert result.pipeline.stats["inline-constant-if"].changes == 1
    for n in (1, 4):
        assert_same(original, model, {"x": np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)})


def test_branch_returning_an_outer_value_gets_an_identity():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        c = Constant <value = bool {1}> ()
        t = Relu(x)
        y = If (c) <
            then_branch = tb () => (float[3] a) { a = Identity(t) },
            else_branch = eb () => (float[3] a2) { a2 = Neg(t) }
        >
    }
    """
    original = parse(text)
    model, _ = optimized(original, ["lift-constants", "inline-constant-if"])
    # the branch's Identity is moved and renamed; the graph output name is kept
    assert ops(model.graph) == ["Relu", "Identity"] and model.graph.outputs[0].name == "y"
    assert_same(original, model, {"x": np.array([-1, 0, 1], np.float32)})


def test_branch_returning_the_same_value_twice_and_a_branch_initializer():
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["s"])], "tb", [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "k")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"])], "eb", [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("n", "n", "n")],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y1", "y2", "y3"], then_branch=then_branch, else_branch=else_branch)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("y1", "y2", "y3")],
        [numpy_helper.from_array(np.array(True), "c")],
    )
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model, _ = optimized(original, ["inline-constant-if"])
    assert ops(model.graph) == ["Add", "Identity", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["y1", "y2", "y3"]
    # (onnxruntime 1.32 returns garbage for a subgraph output listed twice, so numpy is the reference here)
    got = run(graphopt.to_bytes(model), {"x": np.array([1, 2, 3], np.float32)})
    np.testing.assert_array_equal(np.stack(got), [[2, 4, 6], [2, 4, 6], [1, 2, 3]])


def test_condition_that_is_an_overridable_input_is_not_inlined():
    text = """
    <ir_version: 4, opset_import: ["" : 11]>
    g (float[3] x, bool c) => (float[3] y) <bool c = {1}> {
        y = If (c) <
            then_branch = tb () => (float[3] a) { a = Neg(x) },
            else_branch = eb () => (float[3] a2) { a2 = Abs(x) }
        >
    }
    """
    model, result = optimized(parse(text))
    assert ops(model.graph) == ["If"]
    assert result.pipeline.stats["inline-constant-if"].changes == 0


def test_nested_constant_if_inside_a_loop_body():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, int64 n) => (float[3] y) {
        y = Loop (n, , x) <
            body = b (int64 i, bool cin, float[3] acc) => (bool cout, float[3] next) {
                cout = Identity(cin)
                k = Constant <value = bool {0}> ()
                next = If (k) <
                    then_branch = tb () => (float[3] p) { p = Neg(acc) },
                    else_branch = eb () => (float[3] q) {
                        one = Constant <value_float = 1.0> ()
                        q = Add(acc, one)
                    }
                >
            }
        >
    }
    """
    original = parse(text)
    model, _ = optimized(original)
    body = next(iter(model.graph)).attr("body")
    assert ops(body) == ["Identity", "Add"]
    assert [v.name for v in body.outputs] == ["cout", "next"]
    for n in (0, 3):
        assert_same(original, model, {"x": np.array([1, 2, 3], np.float32), "n": np.array(n, np.int64)})


def test_inlining_then_folding_reaches_a_constant():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        c = Constant <value = bool {1}> ()
        k = If (c) <
            then_branch = tb () => (float[3] a) {
                v = Constant <value = float[3] {1, 2, 3}> ()
                a = Neg(v)
            },
            else_branch = eb () => (float[3] b) { b = Identity(x) }
        >
        y = Add(x, k)
    }
    """
    original = parse(text)
    model, _ = optimized(original)
    assert ops(model.graph) == ["Add"]
    assert_same(original, model, {"x": np.array([1, 2, 3], np.float32)})


LOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y, float[3] w) {
    trip = Constant <value = int64 {0}> ()
    y, s = Loop (trip, , x) <
        body = b (int64 i, bool cin, float[3] acc) => (bool cout, float[3] next, float[3] scan) {
            cout = Identity(cin)
            next = Neg(acc)
            scan = Identity(acc)
        }
    >
    w = Relu(x)
}
"""


def test_loop_that_never_runs_is_its_initial_values():
    original = parse(LOOP)
    model, result = optimized(original)
    assert ops(model.graph) == ["Identity", "Relu"]
    assert result.pipeline.stats["inline-constant-if"].changes == 1
    assert_same(original, model, {"x": np.array([1, -2, 3], np.float32)})


def test_loop_whose_scan_output_is_read_stays():
    original = parse(LOOP.replace("float[3] w) {", "float[0, 3] w) {").replace("w = Relu(x)", "w = Relu(s)"))
    model, _ = optimized(original)
    assert "Loop" in ops(model.graph)


def test_loop_body_output_copying_an_outer_constant_becomes_a_body_constant():
    # torchscript's Loop bodies pass the outer "keep going" flag through Identity; the body output keeps
    # its name as a body initializer (onnxruntime runs that), while a main-graph output stays computed
    original = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y, bool flag) {
        trips = Constant <value = int64 {3}> ()
        keep = Constant <value = bool {1}> ()
        y = Loop (trips, keep, x) <
            body = b (int64 i, bool c, float[N, 4] h) => (bool c_out, float[N, 4] h_out) {
                c_out = Identity(keep)
                h_out = Tanh(h)
            }
        >
        flag = Identity(keep)
    }
    """)
    model, _ = optimized(original)
    (loop,) = [n for n in model.graph if n.op_type == "Loop"]
    (body,) = loop.subgraphs()
    assert ops(body) == ["Tanh"]
    assert [v.name for v in body.outputs] == ["c_out", "h_out"] and "c_out" in body.initializers
    assert ops(model.graph) == ["Loop", "Identity"]  # the model output "flag" is still a node's
    assert_same(original, model, {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)})
