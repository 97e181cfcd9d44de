"""eliminate-noops: every rule fires where it must (structure, IR, exact outputs vs onnxruntime on the
original at two shapes) and not where it must not (with the reason it gives)."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.ir import verify
from graphopt.passes.simplify import noop
from graphopt.pipeline import PassContext, PassManager
from graphopt.shapes import infer_shapes
from graphopt.verify import generate_inputs
from tests.helpers import parse, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def simplify(text: str, *, infer: bool = True, header: str = HEADER):
    """Parse, (infer shapes), run eliminate-noops once (for its rule counts), then to a fixed point."""
    original = parse(f"{header}\n{text}")
    model = graphopt.load(original)
    if infer:
        infer_shapes(model)
    fired = noop.EliminateNoops().run(model, PassContext()).details["rules"]
    verify(model)
    PassManager(["eliminate-noops", "eliminate-dead-nodes"]).run(model)  # checks the IR after each pass
    return original, model, fired


def ops(graph) -> list[str]:
    """Op types in order, Constant nodes aside (shape operands; this pipeline does not lift them)."""
    return [n.op_type for n in graph if n.op_type != "Constant"]


def assert_same_outputs(original, model, sizes=(2, 5)) -> None:
    """Exactly equal outputs (no-op removal changes no bits; -0.0 == 0.0 for x + 0) at each size of N."""
    candidate = graphopt.to_bytes(model)
    for seed, n in enumerate(sizes):
        feeds = generate_inputs(original, dims={"N": n}, seed=seed)
        for want, got in zip(run(original, feeds), run(candidate, feeds), strict=True):
            assert want.dtype == got.dtype and want.shape == got.shape
            np.testing.assert_array_equal(want, got)


def reasons(text: str, rule: str, *, infer: bool = True, header: str = HEADER) -> list[str]:
    model = graphopt.load(parse(f"{header}\n{text}"))
    if infer:
        infer_shapes(model)
    return [r.reason for r in noop.explain(model) if r.rule == rule]


# -- positive cases: (rule, graph text, ops left) ------------------------------------
POSITIVE = [
    ("cast-same-type", "g (float[N, 4] x) => (float[N, 4] y) { c = Cast <to = 1> (x)  y = Relu(c) }", ["Relu"]),
    ("cast-roundtrip", """g (float[N, 4] x) => (float[N, 4] y) {
        w = Cast <to = 11> (x)  c = Cast <to = 1> (w)  y = Relu(c) }""", ["Relu"]),
    ("cast-roundtrip", """g (int32[N, 4] x) => (int32[N, 4] y) {
        w = Cast <to = 7> (x)  c = Cast <to = 6> (w)  y = Abs(c) }""", ["Abs"]),
    ("cast-roundtrip", """g (float16[N, 4] x) => (float16[N, 4] y) {
        w = Cast <to = 1> (x)  c = Cast <to = 10> (w)  y = Relu(c) }""", ["Relu"]),
    ("castlike-same-type", """g (float[N, 4] x, float[1] l) => (float[N, 4] y) {
        c = CastLike(x, l)  y = Relu(c) }""", ["Relu"]),
    ("reshape-same-shape", """g (float[2, 3, 4] x) => (float[2, 3, 4] y) {
        s = Constant <value = int64[3] {2, -1, 4}> ()  r = Reshape(x, s)  y = Relu(r) }""", ["Relu"]),
    ("reshape-same-shape", """g (float[N, 4] x) => (float[N, 4] y) {
        s = Constant <value = int64[2] {0, 4}> ()  r = Reshape(x, s)  y = Relu(r) }""", ["Relu"]),
    ("reshape-same-shape", """g (float[N, 4] x) => (float[N, 4] y) {
        s = Constant <value = int64[2] {0, -1}> ()  r = Reshape(x, s)  y = Relu(r) }""", ["Relu"]),
    ("reshape-of-view", """g (float[N, 12] x) => (float[N, 4, 3] y) {
        a = Constant <value = int64[3] {0, 6, 2}> ()  b = Constant <value = int64[3] {-1, 4, 3}> ()
        r1 = Reshape(x, a)  r2 = Reshape(r1, b)  y = Relu(r2) }""", ["Reshape", "Relu"]),
    ("reshape-of-view", """g (float[N, 12] x) => (float[N, 4, 3] y) {
        ax = Constant <value = int64[1] {1}> ()  b = Constant <value = int64[3] {0, 4, 3}> ()
        u = Unsqueeze(x, ax)  r2 = Reshape(u, b)  y = Relu(r2) }""", ["Reshape", "Relu"]),
    ("view-chain-to-reshape", """g (float[N, 3, 4] x) => (float[N, 12] y) {
        ax = Constant <value = int64[1] {1}> ()  u = Unsqueeze(x, ax)  f = Flatten <axis = 2> (u)
        y = Relu(f) }""", ["Reshape", "Relu"]),
    ("view-chain-to-reshape", """g (float[1, N, 4] x) => (float[N, 4, 1] y) {
        a0 = Constant <value = int64[1] {0}> ()  a2 = Constant <value = int64[1] {2}> ()
        s = Squeeze(x, a0)  u = Unsqueeze(s, a2)  y = Relu(u) }""", ["Reshape", "Relu"]),
    ("merge-squeezes", """g (float[N, 4] x) => (float[N, 1, 4, 1] y) {
        a = Constant <value = int64[1] {1}> ()  b = Constant <value = int64[1] {-1}> ()
        u1 = Unsqueeze(x, a)  u2 = Unsqueeze(u1, b)  y = Relu(u2) }""", ["Unsqueeze", "Relu"]),
    ("merge-squeezes", """g (float[N, 1, 4, 1] x) => (float[N, 4] y) {
        a = Constant <value = int64[1] {1}> ()  b = Constant <value = int64[1] {2}> ()
        s1 = Squeeze(x, a)  s2 = Squeeze(s1, b)  y = Relu(s2) }""", ["Squeeze", "Relu"]),
    ("unsqueeze-squeeze", """g (float[N, 4] x) => (float[N, 4] y) {
        a = Constant <value = int64[2] {0, -1}> ()  u = Unsqueeze(x, a)  s = Squeeze(u, a)  y = Relu(s) }""",
     ["Relu"]),
    ("squeeze-unsqueeze", """g (float[N, 1, 4] x) => (float[N, 1, 4] y) {
        a = Constant <value = int64[1] {1}> ()  s = Squeeze(x, a)  u = Unsqueeze(s, a)  y = Relu(u) }""",
     ["Relu"]),
    ("flatten-2d", "g (float[N, 4] x) => (float[N, 4] y) { f = Flatten(x)  y = Relu(f) }", ["Relu"]),
    ("transpose-identity", """g (float[N, 4, 3] x) => (float[N, 4, 3] y) {
        t = Transpose <perm = [0, 1, 2]> (x)  y = Relu(t) }""", ["Relu"]),
    ("transpose-pair-cancel", """g (float[N, 4, 3] x) => (float[N, 4, 3] y) {
        t1 = Transpose <perm = [1, 2, 0]> (x)  t2 = Transpose <perm = [2, 0, 1]> (t1)  y = Relu(t2) }""",
     ["Relu"]),
    ("transpose-pair-cancel", """g (float[N, 4] x) => (float[N, 4] y) {
        t1 = Transpose(x)  t2 = Transpose(t1)  y = Relu(t2) }""", ["Relu"]),
    ("transpose-pair-compose", """g (float[N, 4, 3] x) => (float[3, 4, N] y) {
        t1 = Transpose <perm = [1, 0, 2]> (x)  t2 = Transpose <perm = [2, 0, 1]> (t1)  y = Relu(t2) }""",
     ["Transpose", "Relu"]),
    ("add-zero", """g (float[N, 4] x) => (float[N, 4] y) {
        z = Constant <value = float[1, 4] {0, 0, -0, 0}> ()  a = Add(x, z)  y = Relu(a) }""", ["Relu"]),
    ("add-zero", """g (float[N, 4] x) => (float[N, 4] y) {
        z = Constant <value = float {0}> ()  a = Add(z, x)  y = Relu(a) }""", ["Relu"]),
    ("sub-zero", """g (float[N, 4] x) => (float[N, 4] y) {
        z = Constant <value = float[4] {0, 0, 0, 0}> ()  a = Sub(x, z)  y = Relu(a) }""", ["Relu"]),
    ("mul-one", """g (int64[N, 4] x) => (int64[N, 4] y) {
        o = Constant <value = int64 {1}> ()  a = Mul(o, x)  y = Abs(a) }""", ["Abs"]),
    ("div-one", """g (int32[N, 4] x) => (int32[N, 4] y) {
        o = Constant <value = int32[1, 1] {1}> ()  a = Div(x, o)  y = Abs(a) }""", ["Abs"]),
    ("pad-zero", """g (float[N, 4] x) => (float[N, 4] y) {
        p = Constant <value = int64[4] {0, 0, 0, 0}> ()  a = Pad <mode = "reflect"> (x, p)  y = Relu(a) }""",
     ["Relu"]),
    ("slice-all", """g (float[N, 4] x) => (float[N, 4] y) {
        s = Constant <value = int64[2] {0, -9}> ()  e = Constant <value = int64[2] {9223372036854775807, 4}> ()
        a = Slice(x, s, e)  y = Relu(a) }""", ["Relu"]),
    ("expand-same-shape", """g (float[N, 4] x) => (float[N, 4] y) {
        s = Constant <value = int64[2] {1, 4}> ()  a = Expand(x, s)  y = Relu(a) }""", ["Relu"]),
    ("tile-ones", """g (float[N, 4] x) => (float[N, 4] y) {
        r = Constant <value = int64[2] {1, 1}> ()  a = Tile(x, r)  y = Relu(a) }""", ["Relu"]),
    ("reduce-keepdims-then-drop", """g (float[N, 8, 3, 3] x) => (float[N, 8] y) {
        s = Constant <value = int64[2] {0, -1}> ()  m = ReduceMean <axes = [2, 3]> (x)  r = Reshape(m, s)
        y = Relu(r) }""", ["ReduceMean", "Relu"]),
    ("reduce-keepdims-then-drop", """g (float[N, 8, 3] x) => (float[8] y) {
        ax = Constant <value = int64[2] {0, 2}> ()  m = ReduceSum(x, ax)  y = Squeeze(m, ax) }""", ["ReduceSum"]),
    ("reduce-keepdims-then-drop", """g (float[N, 8, 3, 3] x) => (float[N, 8] y) {
        m = ReduceMax <axes = [-1, -2]> (x)  y = Flatten(m) }""", ["ReduceMax"]),
    ("view-around-elementwise", """g (float[N, 6] x) => (float[N, 6] y) {
        s3 = Constant <value = int64[3] {0, 2, 3}> ()  s2 = Constant <value = int64[2] {0, 6}> ()
        h = Constant <value = float {0.5}> ()  k = Constant <value = float[1] {3}> ()
        v = Reshape(x, s3)  p = Pow(v, k)  a = Add(v, p)  t = Tanh(a)  m = Mul(t, h)  r = Reshape(m, s2)
        y = Neg(r) }""", ["Pow", "Add", "Tanh", "Mul", "Neg"]),
    ("concat-single", "g (float[N, 4] x) => (float[N, 4] y) { a = Concat <axis = 0> (x)  y = Relu(a) }", ["Relu"]),
    ("split-single", """g (float[N, 4] x) => (float[N, 4] y) {
        a = Split <axis = 1> (x)  y = Relu(a) }""", ["Relu"]),
]


@pytest.mark.parametrize("rule, text, left", POSITIVE, ids=[f"{c[0]}-{i}" for i, c in enumerate(POSITIVE)])
def test_rule_fires_and_keeps_outputs(rule, text, left):
    original, model, fired = simplify(text)
    assert fired.get(rule, 0) >= 1, fired
    assert ops(model.graph) == left
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(original, model)


def test_merged_axes_are_right():
    text = """g (float[N, 4, 3] x) => (float[1, N, 1, 4, 1, 3] y) {
        a = Constant <value = int64[2] {0, 2}> ()  b = Constant <value = int64[1] {4}> ()
        u1 = Unsqueeze(x, a)  u2 = Unsqueeze(u1, b)  y = Relu(u2) }"""
    original, model, fired = simplify(text)
    (unsqueeze,) = [n for n in model.graph if n.op_type == "Unsqueeze"]
    assert unsqueeze.inputs[1].const.numpy().tolist() == [0, 2, 4]
    assert_same_outputs(original, model)


def test_squeeze_merge_with_axes_attribute_in_old_opsets():
    text = """g (float[N, 1, 4, 1] x) => (float[N, 4] y) {
        s1 = Squeeze <axes = [3]> (x)  s2 = Squeeze <axes = [1]> (s1)  y = Relu(s2) }"""
    original, model, fired = simplify(text, header='<ir_version: 7, opset_import: ["" : 11]>')
    (squeeze,) = [n for n in model.graph if n.op_type == "Squeeze"]
    assert fired == {"merge-squeezes": 1} and squeeze.attr("axes") == [1, 3]
    assert_same_outputs(original, model)


def test_chains_collapse_in_one_sweep():
    text = """g (float[N, 4, 3] x) => (float[N, 4, 3] y) {
        t1 = Transpose <perm = [1, 0, 2]> (x)  t2 = Transpose <perm = [1, 0, 2]> (t1)
        t3 = Transpose <perm = [2, 1, 0]> (t2)  t4 = Transpose <perm = [2, 1, 0]> (t3)
        a = Constant <value = int64[2] {-1, 12}> ()  b = Constant <value = int64[3] {-1, 6, 2}> ()
        c = Constant <value = int64[3] {-1, 4, 3}> ()
        r1 = Reshape(t4, a)  r2 = Reshape(r1, b)  r3 = Reshape(r2, c)  y = Relu(r3) }"""
    original, model, fired = simplify(text)
    assert ops(model.graph) == ["Relu"]  # Reshape(x, [-1, 4, 3]) with x: [N, 4, 3] is x
    assert fired["transpose-pair-cancel"] == 2 and fired["reshape-of-view"] == 2
    assert fired["reshape-same-shape"] == 1
    assert_same_outputs(original, model)


def test_graph_output_is_renamed_onto_a_node_output():
    text = """g (float[N, 4] x) => (float[N, 4] y) {
        r = Relu(x)  o = Constant <value = float {1}> ()  y = Mul(r, o) }"""
    original, model, fired = simplify(text)
    assert ops(model.graph) == ["Relu"] and model.graph.outputs[0].name == "y"
    assert_same_outputs(original, model)


def test_function_body_gets_constant_nodes_not_initializers():
    header = '<ir_version: 8, opset_import: ["" : 17, "local" : 1]>'
    text = """g (float[N, 4] x) => (float[N, 1, 1, 4] y) { y = local.F(x) }
    <domain: "local", opset_import: ["" : 17]>
    F (a) => (b) {
        ax = Constant <value = int64[1] {1}> ()  u = Unsqueeze(a, ax)  v = Unsqueeze(u, ax)  b = Relu(v) }"""
    original, model, fired = simplify(text, header=header)
    body = model.functions[0].graph
    assert fired == {"merge-squeezes": 1} and [n.op_type for n in body] == ["Constant", "Unsqueeze", "Relu"]
    assert_same_outputs(original, model)


# -- negative cases: (rule, graph text, part of the reason) --------------------------
NEGATIVE = [
    ("cast-same-type", """g (float[N, 4] x) => (float16[N, 4] y) {
        y = Cast <to = 10> (x) }""", "casts float to float16"),
    ("cast-roundtrip", """g (float[N, 4] x) => (float[N, 4] y) {
        w = Cast <to = 10> (x)  c = Cast <to = 1> (w)  y = Relu(c) }""", "float -> float16 is not exact"),
    ("cast-roundtrip", """g (float[N, 4] x) => (int32[N, 4] y) {
        w = Cast <to = 11> (x)  y = Cast <to = 6> (w) }""", "not back to the start"),
    ("castlike-same-type", """g (float[N, 4] x, float16[1] l) => (float16[N, 4] y) {
        y = CastLike(x, l) }""", "the types differ"),
    ("reshape-same-shape", """g (float[N, 4] x) => (float[4, N] y) {
        s = Constant <value = int64[2] {4, -1}> ()  y = Reshape(x, s) }""", "does not provably equal"),
    ("reshape-of-view", """g (float[N, 12] x) => (float[12, 1, N] y) {
        a = Constant <value = int64[2] {12, -1}> ()  b = Constant <value = int64[3] {0, 1, -1}> ()
        r1 = Reshape(x, a)  y = Reshape(r1, b) }""", "target copies dim 0, which the inner Reshape changes"),
    ("view-chain-to-reshape", """g (float[N, 3, 4] x) => (float[N, 1, 3, 4] y, float[N, 12] z) {
        ax = Constant <value = int64[1] {1}> ()  y = Unsqueeze(x, ax)  z = Flatten <axis = 2> (y) }""",
     "used elsewhere"),
    ("view-chain-to-reshape", """g (float[1, N, M] x) => (float[N, M, 1] y) {
        a = Constant <value = int64[1] {0}> ()  b = Constant <value = int64[1] {2}> ()
        s = Squeeze(x, a)  y = Unsqueeze(s, b) }""", "cannot be written as one Reshape target"),
    ("unsqueeze-squeeze", """g (float[N, 1, 4] x) => (float[1, N, 4] y) {
        a = Constant <value = int64[1] {0}> ()  b = Constant <value = int64[1] {2}> ()
        u = Unsqueeze(x, a)  y = Squeeze(u, b) }""", "different axes"),
    ("squeeze-unsqueeze", """g (float[N, 1, 4] x) => (float[1, N, 4] y) {
        a = Constant <value = int64[1] {1}> ()  b = Constant <value = int64[1] {0}> ()
        s = Squeeze(x, a)  y = Unsqueeze(s, b) }""", "different axes"),
    ("merge-squeezes", """g (float[1, N, 4, 1] x) => (float[N, 4] y) {
        s = Squeeze(x)  y = Squeeze(s) }""", "a Squeeze has none: squeeze all"),
    ("flatten-2d", "g (float[N, 4, 2] x) => (float[N, 8] y) { y = Flatten(x) }", "not known to be 2-D"),
    ("reduce-keepdims-then-drop", """g (float[N, 8, 3, 3] x) => (float[N, 8, 1] y) {
        s = Constant <value = int64[3] {0, 8, 1}> ()  m = ReduceMean <axes = [2, 3]> (x)  y = Reshape(m, s) }""",
     "does not just drop the reduced dims"),
    ("reduce-keepdims-then-drop", """g (float[N, 8, 3, 3] x) => (float[N, 8] y, float[N, 8, 1, 1] z) {
        z = ReduceMean <axes = [2, 3]> (x)  y = Flatten(z) }""", "used elsewhere"),
    ("view-around-elementwise", """g (float[N, 6] x) => (float[N, 6] y, float[N, 2, 3] z) {
        s3 = Constant <value = int64[3] {0, 2, 3}> ()  s2 = Constant <value = int64[2] {0, 6}> ()
        v = Reshape(x, s3)  z = Tanh(v)  y = Reshape(z, s2) }""", "the input is used elsewhere"),
    ("view-around-elementwise", """g (float[N, 6] x) => (float[N, 6] y) {
        s3 = Constant <value = int64[3] {0, 2, 3}> ()  s2 = Constant <value = int64[2] {0, 6}> ()
        c = Constant <value = float[3] {1, 2, 3}> ()
        v = Reshape(x, s3)  a = Add(v, c)  y = Reshape(a, s2) }""", "c> is not elementwise"),
    ("view-around-elementwise", """g (float[N, 6] x) => (float[6, N] y) {
        s3 = Constant <value = int64[3] {0, 2, 3}> ()  s2 = Constant <value = int64[2] {6, -1}> ()
        v = Reshape(x, s3)  a = Relu(v)  y = Reshape(a, s2) }""", "does not provably give back"),
    ("view-around-elementwise", """g (float[N, 6] x) => (float[1, N, 6] y) {
        s3 = Constant <value = int64[3] {0, 2, 3}> ()  s2 = Constant <value = int64[3] {1, -1, 6}> ()
        c = Constant <value = float[1, 1, 1] {2}> ()
        v = Reshape(x, s3)  a = Mul(v, c)  y = Reshape(a, s2) }""", "does not provably give back"),
    ("transpose-identity", "g (float[N, 4] x) => (float[4, N] y) { y = Transpose <perm = [1, 0]> (x) }",
     "is not the identity"),
    ("transpose-pair-cancel", """g (float[N, 4, 3] x) => (float[3, 4, N] y) {
        t = Transpose <perm = [1, 0, 2]> (x)  y = Transpose <perm = [2, 0, 1]> (t) }""", "is not the identity"),
    ("transpose-pair-compose", """g (float[N, 4] x) => (float[4, N] y) {
        r = Relu(x)  y = Transpose(r) }""", "the input is not a Transpose"),
    ("add-zero", """g (float[4] x) => (float[1, 1, 4] y) {
        z = Constant <value = float[1, 1, 4] {0, 0, 0, 0}> ()  y = Add(x, z) }""", "exceeds the input's 1"),
    ("add-zero", """g (float[N] x) => (float[3] y) {
        z = Constant <value = float[3] {0, 0, 0}> ()  y = Add(x, z) }""", "may enlarge the input shape", (1, 3)),
    ("sub-zero", """g (float[N, 4] x) => (float[N, 4] y) {
        z = Constant <value = float {0}> ()  y = Sub(z, x) }""", "operand 1 is not a (small) constant"),
    ("mul-one", """g (float[N, 4] x) => (float[N, 4] y) {
        o = Constant <value = float {1.0000001}> ()  y = Mul(x, o) }""", "is not all 1"),
    ("div-one", """g (float[N, 4] x) => (float[N, 4] y) {
        o = Constant <value = float {1}> ()  y = Div(o, x) }""", "operand 1 is not a (small) constant"),
    ("pad-zero", """g (float[N, 4] x) => (float[N, 5] y) {
        p = Constant <value = int64[4] {0, 0, 0, 1}> ()  y = Pad(x, p) }""", "are not all zero"),
    ("slice-all", """g (float[N, 4] x) => (float[N, 3] y) {
        s = Constant <value = int64[1] {0}> ()  e = Constant <value = int64[1] {3}> ()
        ax = Constant <value = int64[1] {1}> ()  y = Slice(x, s, e, ax) }""", "ends at 3 on axis 1 of size 4"),
    ("slice-all", """g (float[N, 4] x) => (float[N, 4] y) {
        s = Constant <value = int64[1] {0}> ()  e = Constant <value = int64[1] {2147483647}> ()
        y = Slice(x, s, e) }""", "of size N"),
    ("expand-same-shape", """g (float[4] x) => (float[3, 4] y) {
        s = Constant <value = int64[2] {3, 4}> ()  y = Expand(x, s) }""", "exceeds"),
    ("tile-ones", """g (float[N, 4] x) => (float[N, 8] y) {
        r = Constant <value = int64[2] {1, 2}> ()  y = Tile(x, r) }""", "are not all one"),
    ("concat-single", "g (float[N, 4] x) => (float[N, 8] y) { y = Concat <axis = 1> (x, x) }", "more than one"),
    ("split-single", """g (float[N, 4] x) => (float[N, 2] y, float[N, 2] z) {
        y, z = Split <axis = 1> (x) }""", "more than one output"),
]


@pytest.mark.parametrize("case", NEGATIVE, ids=[f"{c[0]}-{i}" for i, c in enumerate(NEGATIVE)])
def test_rule_does_not_fire_and_says_why(case):
    rule, text, why, *sizes = case  # sizes of N where the original is valid, if not (2, 5)
    found = reasons(text, rule)
    assert any(why in r for r in found), found
    original, model, fired = simplify(text)
    assert rule not in fired
    assert_same_outputs(original, model, *sizes)


def test_without_types_nothing_shape_dependent_fires():
    text = """g (float[N, 4] x) => (float[N, 4] y) {
        r = Relu(x)  c = Cast <to = 1> (r)
        s = Constant <value = int64[2] {0, 4}> ()  q = Reshape(c, s)
        z = Constant <value = float[1, 4] {0, 0, 0, 0}> ()  y = Add(q, z) }"""
    found = {(r.rule, r.reason) for r in noop.explain(graphopt.load(parse(f"{HEADER}\n{text}")))}
    assert ("cast-same-type", "the input's element type is unknown") in found
    assert ("reshape-same-shape", "the input shape is unknown") in found
    assert ("add-zero", "the input rank is unknown and the constant is not a scalar; "
            "operand 0 is not a (small) constant") in found


def test_graph_input_cannot_take_the_output_name():
    text = "g (float[N, 4] x) => (float[N, 4] y) { y = Cast <to = 1> (x) }"
    assert reasons(text, "cast-same-type") == ["'y' is a graph output and 'x' is a graph input"]
    original, model, fired = simplify(text)
    assert ops(model.graph) == ["Cast"] and [v.name for v in model.graph.inputs] == ["x"]


def test_output_that_is_already_an_output_or_initializer_stays():
    text = """g (float[N, 4] x) => (float[N, 4] y, float[N, 4] r, float[4] w2) <float[4] w = {1, 2, 3, 4}> {
        r = Relu(x)  y = Cast <to = 1> (r)  w2 = Cast <to = 1> (w) }"""
    found = reasons(text, "cast-same-type")
    assert "'y' is a graph output and 'r' is itself a graph output" in found
    assert "'w2' is a graph output and 'w' is an initializer" in found
    original, model, fired = simplify(text)
    assert [v.name for v in model.graph.outputs] == ["y", "r", "w2"]
    assert_same_outputs(original, model)


def test_subgraph_bodies_are_simplified_but_outer_values_never_renamed():
    text = """g (float[N, 4] x, bool c) => (float[N, 4] y) {
        t = Relu(x)
        y = If (c) <
            then_branch = then_g () => (float[N, 4] o1) { o1 = Cast <to = 1> (t) },
            else_branch = else_g () => (float[N, 4] o2) {
                n = Neg(t)  one = Constant <value = float {1}> ()  m = Mul(n, one)  o2 = Cast <to = 1> (m) }
        >
    }"""
    original, model, fired = simplify(text)
    if_node = next(n for n in model.graph if n.op_type == "If")
    then_g, else_g = if_node.attr("then_branch"), if_node.attr("else_branch")
    assert ops(then_g) == ["Cast"]  # o1 would have to become the outer t
    assert ops(else_g) == ["Neg"] and else_g.outputs[0].name == "o2"
    candidate = graphopt.to_bytes(model)
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "c": np.array(cond)}
        np.testing.assert_array_equal(run(original, feeds)[0], run(candidate, feeds)[0])


def test_new_constants_inside_a_body_live_in_that_body():
    text = """g (float[N, 4] x, bool c) => (float[N, 1, 1, 4] y) {
        a = Constant <value = int64[1] {1}> ()
        y = If (c) <
            then_branch = then_g () => (float[N, 1, 1, 4] o1) {
                u = Unsqueeze(x, a)  v = Unsqueeze(u, a)  o1 = Relu(v) },
            else_branch = else_g () => (float[N, 1, 1, 4] o2) { w = Unsqueeze(x, a)  o2 = Unsqueeze(w, a) }
        >
    }"""
    original, model, fired = simplify(text)
    if_node = next(n for n in model.graph if n.op_type == "If")
    then_g, else_g = if_node.attr("then_branch"), if_node.attr("else_branch")
    assert fired == {"merge-squeezes": 2} and ops(then_g) == ["Unsqueeze", "Relu"] and ops(else_g) == ["Unsqueeze"]
    assert len(then_g.initializers) == 1 and else_g.outputs[0].name == "o2"
    candidate = graphopt.to_bytes(model)
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "c": np.array(cond)}
        np.testing.assert_array_equal(run(original, feeds)[0], run(candidate, feeds)[0])


def test_ops_of_other_domains_are_never_touched():
    header = '<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>'
    text = """g (float[N, 4] x) => (float[N, 4] y) {
        c = custom.Cast <to = 1> (x)  t1 = custom.Transpose(c)  y = custom.Transpose(t1) }"""
    model = graphopt.load(parse(f"{header}\n{text}"))
    assert noop.EliminateNoops().run(model, PassContext()).changes == 0


def test_negative_zero_through_add_zero_compares_equal():
    text = """g (float[4] x) => (float[4] y) {
        z = Constant <value = float {0}> ()  a = Add(x, z)  y = Neg(a) }"""
    original, model, fired = simplify(text)
    assert fired == {"add-zero": 1}
    feeds = {"x": np.array([-0.0, 0.0, -1.5, np.nan], np.float32)}
    np.testing.assert_array_equal(run(original, feeds)[0], run(graphopt.to_bytes(model), feeds)[0])


# -- random chains of layout ops (the shape algebra behind the view rules) -----------
def _merge(dims: list[tuple[int, bool]]) -> tuple[int, bool]:
    """The product of dims given as (static factor, whether N is a factor)."""
    return int(np.prod([s for s, _ in dims], dtype=np.int64)), any(n for _, n in dims)


class _Chain:
    """Builds a random, valid chain of 2-5 Squeeze/Unsqueeze/Flatten/Reshape/Transpose ops on x: [N, ...].

    Dims are tracked as (static factor, whether N is a factor), so every op is valid for any N.
    """

    def __init__(self, rng: np.random.Generator, opset: int) -> None:
        self.rng, self.opset, self.lines, self.count = rng, opset, [], 0
        self.start = [int(d) for d in rng.choice([1, 2, 3], size=rng.integers(1, 4))]
        self.dims = [(1, True)] + [(d, False) for d in self.start]
        self.src = "x"

    def name(self) -> str:
        self.count += 1
        return f"v{self.count}"

    def const(self, values: list[int]) -> str:
        name = self.name()
        self.lines.append(f"{name} = Constant <value = int64[{len(values)}] {{{', '.join(map(str, values))}}}> ()")
        return name

    def with_axes(self, op: str, axes: list[int]) -> str:
        if self.opset < 13:
            return f"{op} <axes = [{', '.join(map(str, axes))}]> ({self.src})"
        return f"{op}({self.src}, {self.const(axes)})"

    def step(self) -> None:
        rng, dims, rank = self.rng, self.dims, len(self.dims)
        kind = rng.choice(["Unsqueeze", "Squeeze", "Flatten", "Reshape", "Transpose"])
        ones = [i for i, d in enumerate(dims) if d == (1, False)]
        if kind == "Squeeze" and ones:
            axes = sorted(rng.choice(ones, size=rng.integers(1, len(ones) + 1), replace=False).tolist())
            expr = self.with_axes("Squeeze", [a - rank if rng.random() < 0.3 else a for a in axes])
            self.dims = [d for i, d in enumerate(dims) if i not in axes]
        elif kind == "Flatten":
            axis = int(rng.integers(0, rank + 1))
            expr = f"Flatten <axis = {axis}> ({self.src})"
            self.dims = [_merge(dims[:axis]), _merge(dims[axis:])]
        elif kind == "Reshape" and rank >= 2:
            i = int(rng.integers(0, rank - 1))
            self.dims = dims[:i] + [_merge(dims[i:i + 2])] + dims[i + 2:]
            target = [-1 if n else s for s, n in self.dims]
            if i > 0 and rng.random() < 0.5:
                target[0] = 0  # position 0 is unchanged: copy it
            expr = f"Reshape({self.src}, {self.const(target)})"
        elif kind == "Transpose":
            perm = rng.permutation(rank).tolist()
            expr = f"Transpose <perm = [{', '.join(map(str, perm))}]> ({self.src})"
            self.dims = [dims[p] for p in perm]
        else:
            axes = sorted(rng.choice(rank + 2, size=int(rng.integers(1, 3)), replace=False).tolist())
            axes = [a if a < rank + len(axes) else rank for a in axes]
            axes = sorted(set(axes))
            expr = self.with_axes("Unsqueeze", [a - rank - len(axes) if rng.random() < 0.3 else a for a in axes])
            for a in axes:
                self.dims.insert(a, (1, False))
        out = self.name()
        self.lines.append(f"{out} = {expr}")
        self.src = out

    def text(self) -> str:
        for _ in range(self.rng.integers(2, 6)):
            self.step()
        out_dims = ", ".join("N" if d == (1, True) else str(d[0]) if not d[1] else f"Y{k}"
                             for k, d in enumerate(self.dims))
        body = "\n        ".join([*self.lines, f"y = Relu({self.src})"])
        return (f"g (float[N{''.join(f', {d}' for d in self.start)}] x) => (float[{out_dims}] y) {{\n"
                f"        {body}\n    }}")


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("infer", [False, True], ids=["untyped", "typed"])
def test_random_view_chains_are_exact(opset, infer):
    rng = np.random.default_rng(opset * 2 + infer)
    header = f'<ir_version: 7, opset_import: ["" : {opset}]>'
    total: dict[str, int] = {}
    for _ in range(60):
        text = _Chain(rng, opset).text()
        original, model, fired = simplify(text, infer=infer, header=header)
        for rule, count in fired.items():
            total[rule] = total.get(rule, 0) + count
        try:
            assert_same_outputs(original, model, sizes=(0, 1, 3))
        except AssertionError as err:
            raise AssertionError(f"{text}\nfired: {fired}") from err
    assert total.get("merge-squeezes", 0) and total.get("transpose-pair-compose", 0), total


def _broadcast(a: list[str], b: list[str]) -> list[str]:
    """Numpy broadcasting of dims "N", "1", "3" (N meets 3 only where N is 1 or 3: the result is 3)."""
    a, b = ["1"] * (len(b) - len(a)) + a, ["1"] * (len(a) - len(b)) + b
    return [y if x == "1" else x if y == "1" else "3" if "3" in (x, y) else x for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("infer", [False, True], ids=["untyped", "typed"])
def test_random_neutral_operands_are_exact(infer):
    """x op c for random shapes of x (N, 1, 3) and of an all-neutral c that broadcasts against x at N in {1, 3}:
    the rewrite must never change the output's shape or dtype (here checked exactly, at N = 1 and 3)."""
    rng = np.random.default_rng(7 + infer)
    fired_total = 0
    for _ in range(80):
        op = str(rng.choice(["Add", "Sub", "Mul", "Div"]))
        dtype = str(rng.choice(["float", "int64"]))
        x_dims = [str(d) for d in rng.choice(["N", "1", "3"], size=rng.integers(0, 4))]
        c_dims = [str(rng.choice(["1", "3"])) for _ in range(rng.integers(0, len(x_dims) + 2))]
        neutral = 0 if op in ("Add", "Sub") else 1
        values = ", ".join([str(neutral)] * int(np.prod([int(d) for d in c_dims], dtype=np.int64)))
        const = f"{dtype}[{', '.join(c_dims)}] {{{values}}}" if c_dims else f"{dtype} {{{neutral}}}"
        operands = "x, c" if op in ("Sub", "Div") or rng.random() < 0.5 else "c, x"
        x_type, y_type = (f"{dtype}[{', '.join(d)}]" if d else dtype for d in (x_dims, _broadcast(x_dims, c_dims)))
        text = f"""g ({x_type} x) => ({y_type} y) {{
            c = Constant <value = {const}> ()  a = {op}({operands})  y = Abs(a) }}"""
        original, model, fired = simplify(text, infer=infer)
        fired_total += sum(fired.values())
        try:
            assert_same_outputs(original, model, sizes=(1, 3))
        except AssertionError as err:
            raise AssertionError(f"{text}\nfired: {fired}") from err
    assert 10 < fired_total < 80, fired_total  # many fire, not all (some constants grow the shape)
