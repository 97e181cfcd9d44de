"""fold-shapes and infer-shapes: shape chains fold where dims are static, dynamic dims stay dynamic.

Every rewritten model is run at two input shapes against onnxruntime on the original.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import graphopt
import graphopt.passes.simplify  # noqa: F401 - registers the passes
from graphopt.ir import TensorType
from graphopt.optimize import optimize
from tests.helpers import parse, run

PIPELINE = ["lift-constants", "fold-constants", "fold-shapes", "eliminate-dead-nodes", "remove-unused-initializers"]


def optimized(text: str, passes=None, config=None):
    original = parse(text)
    model = graphopt.load(original)
    result = optimize(model, passes or PIPELINE, config=config)
    return original, model, result


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def node(model, op: str):
    return next(n for n in model.graph if n.op_type == op)


def target(model, op: str = "Reshape") -> list[int]:
    value = node(model, op).inputs[1]
    assert value.const is not None, f"{op} target is still computed"
    return value.const.numpy().tolist()


def check_two_shapes(original, model, shapes: dict[str, list[tuple[int, ...]]], dtype=np.float32) -> None:
    rng = np.random.default_rng(0)
    data = graphopt.to_bytes(model)
    for i in range(len(next(iter(shapes.values())))):
        feeds = {name: rng.standard_normal(s[i]).astype(dtype) for name, s in shapes.items()}
        for expected, got in zip(run(original, feeds), run(data, feeds), strict=True):
            assert expected.shape == got.shape
            np.testing.assert_array_equal(expected, got)


HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, seq, 64] x) => (float[batch, 2, seq, 32] y) {
    s0 = Shape(x)
    i0 = Constant <value = int64 {0}> ()
    b = Gather <axis = 0> (s0, i0)
    s1 = Shape(x)
    i1 = Constant <value = int64 {1}> ()
    n = Gather <axis = 0> (s1, i1)
    ax = Constant <value = int64[1] {0}> ()
    ub = Unsqueeze(b, ax)
    un = Unsqueeze(n, ax)
    h = Constant <value = int64[1] {2}> ()
    d = Constant <value = int64[1] {32}> ()
    shape = Concat <axis = 0> (ub, un, h, d)
    r = Reshape(x, shape)
    y = Transpose <perm = [0, 2, 1, 3]> (r)
}
"""


def test_torchscript_style_reshape_uses_copied_dims_and_the_chain_disappears():
    original, model, result = optimized(HEADS)
    assert ops(model) == ["Reshape", "Transpose"]
    assert target(model) == [0, 0, 2, 32]
    assert [d for d in model.graph.outputs[0].shape] == ["batch", 2, "seq", 32]  # still symbolic
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)]})
    assert optimize(model, ["fold-shapes"]).pipeline.stats["fold-shapes"].changes == 0


def test_static_dims_become_constants_and_reshape_copies_the_dynamic_one():
    # The brief's example: Reshape(x, Concat(Gather(Shape(x), 0), [128, 768])) -> Reshape(x, [0, 128, 768]),
    # and Gather/Slice of the static dims fold to constants.
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 128, 12, 64] x) => (float[batch, 128, 768] y, float[128, 12, 64] z, float[batch, 128, 12] w) {
        s = Shape(x)
        i0 = Constant <value = int64[1] {0}> ()
        b = Gather <axis = 0> (s, i0)
        rest = Constant <value = int64[2] {128, 768}> ()
        shape = Concat <axis = 0> (b, rest)
        y = Reshape(x, shape)
        idx = Constant <value = int64[3] {1, 2, 3}> ()
        tail = Gather <axis = 0> (s, idx)
        one = Constant <value = int64[1] {1}> ()
        three = Constant <value = int64[1] {3}> ()
        mid = Slice(s, one, three)
        z = ConstantOfShape <value = float[1] {1}> (tail)
        shape2 = Concat <axis = 0> (b, mid)
        minus_one = Constant <value = int64[1] {-1}> ()
        xs = ReduceSum <keepdims = 0> (x, minus_one)
        w = Reshape(xs, shape2)
    }
    """
    original, model, result = optimized(text)
    assert target(model) == [0, 128, 768]
    assert "Shape" not in ops(model) and "Concat" not in ops(model)
    assert node(model, "ConstantOfShape").inputs[0].const.numpy().tolist() == [128, 12, 64]  # too big to fold
    assert [n.inputs[1].const.numpy().tolist() for n in model.graph if n.op_type == "Reshape"] == [
        [0, 128, 768], [0, 128, 12]]
    check_two_shapes(original, model, {"x": [(1, 128, 12, 64), (3, 128, 12, 64)]})


def test_partly_dynamic_concat_keeps_the_dynamic_part_and_merges_constant_pieces():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 8] x) => (float[batch, 3, 4] y) {
        s = Shape(x)
        i0 = Constant <value = int64[1] {0}> ()
        b = Gather <axis = 0> (s, i0)
        three = Constant <value = int64[1] {3}> ()
        four = Constant <value = int64[1] {4}> ()
        shape = Concat <axis = 0> (b, three, four)
        zeros = ConstantOfShape <value = float[1] {1}> (shape)
        y = Mul(zeros, zeros)
    }
    """
    original, model, result = optimized(text)
    concat = node(model, "Concat")
    assert len(concat.inputs) == 2 and concat.inputs[1].const.numpy().tolist() == [3, 4]
    check_two_shapes(original, model, {"x": [(1, 8), (5, 8)]})


def test_expand_target_uses_one_for_dims_equal_to_the_input():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 1, 64] x) => (float[batch, 4, 64] y) {
        s = Shape(x)
        i0 = Constant <value = int64[1] {0}> ()
        b = Gather <axis = 0> (s, i0)
        rest = Constant <value = int64[2] {4, 64}> ()
        shape = Concat <axis = 0> (b, rest)
        y = Expand(x, shape)
    }
    """
    original, model, _ = optimized(text)
    assert ops(model) == ["Expand"]
    assert target(model, "Expand") == [1, 4, 64]
    check_two_shapes(original, model, {"x": [(1, 1, 64), (6, 1, 64)]})


def test_allowzero_reshape_is_rewritten_only_without_literal_zeros():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, seq, 64] x) => (float[batch, seq, 2, 32] y, float[batch, 0, 64] z) {
        s = Shape <start = 0, end = 2> (x)
        rest = Constant <value = int64[2] {2, 32}> ()
        shape = Concat <axis = 0> (s, rest)
        y = Reshape <allowzero = 1> (x, shape)
        first = Shape <start = 0, end = 1> (x)
        zero = Constant <value = int64[2] {0, 64}> ()
        shape2 = Concat <axis = 0> (first, zero)
        i0 = Constant <value = int64[1] {0}> ()
        i1 = Constant <value = int64[1] {1}> ()
        e = Slice(x, i0, i0, i1)
        z = Reshape <allowzero = 1> (e, shape2)
    }
    """
    original, model, _ = optimized(text)
    y, z = (n for n in model.graph if n.op_type == "Reshape")
    assert y.inputs[1].const.numpy().tolist() == [0, 0, 2, 32] and y.attr("allowzero") == 0
    assert z.inputs[1].const is None and z.attr("allowzero") == 1  # 0 there means a real empty dim
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)]})


INFER_WITH_COPY = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, seq, 64] x) => (float[batch, seq2, 32] y) {
    s = Shape(x)
    i0 = Constant <value = int64[1] {0}> ()
    i1 = Constant <value = int64[1] {1}> ()
    b = Gather <axis = 0> (s, i0)
    n = Gather <axis = 0> (s, i1)
    two = Constant <value = int64[1] {2}> ()
    n2 = Mul(n, two)
    d = Constant <value = int64[1] {32}> ()
    shape = Concat <axis = 0> (b, n2, d)
    y = Reshape(x, shape)
}
"""


def test_target_needing_copy_and_infer_is_left_alone_by_default():
    # [0, -1, 32] would fail in onnxruntime at batch 0 where the original works
    original, model, _ = optimized(INFER_WITH_COPY)
    assert node(model, "Reshape").inputs[1].const is None
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)]})


def test_target_needing_copy_and_infer_is_rewritten_when_allowed():
    original, model, _ = optimized(INFER_WITH_COPY, config={"fold-shapes.infer_with_copy": True})
    assert ops(model) == ["Reshape"] and target(model) == [0, -1, 32]
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)]})


def test_single_unknown_dim_becomes_minus_one():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, seq, 64] x, float[batch, seq] m) => (float[bs, 64] y) {
        s = Shape(m)
        n = ReduceProd <keepdims = 1> (s)
        d = Constant <value = int64[1] {64}> ()
        shape = Concat <axis = 0> (n, d)
        y = Reshape(x, shape)
    }
    """
    original, model, _ = optimized(text)
    assert ops(model) == ["Reshape"] and target(model) == [-1, 64]
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)], "m": [(1, 16), (3, 5)]})


def test_torchscript_where_equal_minus_one_pattern_resolves():
    # Expand(x, Where(Equal(shape, -1), ones, shape)): torch's expand(-1 keeps the dim) as exported
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 1] x) => (float[batch, 5] y) {
        s = Shape(x)
        i0 = Constant <value = int64[1] {0}> ()
        b = Gather <axis = 0> (s, i0)
        five = Constant <value = int64[1] {5}> ()
        shape = Concat <axis = 0> (b, five)
        rank = Shape(shape)
        ones = ConstantOfShape <value = int64[1] {1}> (rank)
        minus = Constant <value = int64 {-1}> ()
        neg = Mul(ones, minus)
        eq = Equal(shape, neg)
        fixed = Where(eq, ones, shape)
        y = Expand(x, fixed)
    }
    """
    original, model, _ = optimized(text)
    assert ops(model) == ["Expand"] and target(model, "Expand") == [1, 5]
    check_two_shapes(original, model, {"x": [(1, 1), (4, 1)]})


def test_dims_read_one_by_one_are_read_with_one_shape_slice():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, seq, 64] x) => (float[batch, seq, 2, 32] y) {
        z = Flatten <axis = 0> (x)
        s0 = Shape(x)
        i0 = Constant <value = int64 {0}> ()
        b = Gather <axis = 0> (s0, i0)
        s1 = Shape(x)
        i1 = Constant <value = int64 {1}> ()
        n = Gather <axis = 0> (s1, i1)
        ax = Constant <value = int64[1] {0}> ()
        ub = Unsqueeze(b, ax)
        un = Unsqueeze(n, ax)
        h = Constant <value = int64[1] {2}> ()
        d = Constant <value = int64[1] {32}> ()
        shape = Concat <axis = 0> (ub, un, h, d)
        y = Reshape(z, shape)
    }
    """
    original, model, _ = optimized(text)
    assert ops(model) == ["Flatten", "Shape", "Concat", "Reshape"]  # 2 Shape, 2 Gather, 2 Unsqueeze -> 1 Shape
    shape = node(model, "Shape")
    assert shape.attr("start") == 0 and shape.attr("end") == 2
    assert node(model, "Concat").inputs[1].const.numpy().tolist() == [2, 32]
    check_two_shapes(original, model, {"x": [(1, 16, 64), (3, 5, 64)]})


def test_chain_equal_to_its_input_or_to_dims_of_a_value_is_shortened():
    # torchscript's expand(batch, seq): Where(Equal(s, -1), ones, s) with s = Reshape(Concat(dims), [-1]),
    # and the shape it builds is read by a node fold-shapes cannot rewrite (ConstantOfShape)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[batch, seq] ids) => (float[batch, seq] y) {
        s0 = Shape(ids)
        i0 = Constant <value = int64 {0}> ()
        b = Gather <axis = 0> (s0, i0)
        s1 = Shape(ids)
        i1 = Constant <value = int64 {1}> ()
        n = Gather <axis = 0> (s1, i1)
        ax = Constant <value = int64[1] {0}> ()
        ub = Unsqueeze(b, ax)
        un = Unsqueeze(n, ax)
        cat = Concat <axis = 0> (ub, un)
        flat = Constant <value = int64[1] {-1}> ()
        s = Reshape(cat, flat)
        minus = Constant <value = int64[2] {-1, -1}> ()
        eq = Equal(s, minus)
        ones = Constant <value = int64[2] {1, 1}> ()
        fixed = Where(eq, ones, s)
        y = ConstantOfShape <value = float[1] {1}> (fixed)
    }
    """
    original, model, _ = optimized(text)
    assert ops(model) == ["Shape", "ConstantOfShape"]
    assert node(model, "ConstantOfShape").inputs[0].producer.inputs[0].name == "ids"
    for shape in [(1, 16), (3, 5)]:
        feeds = {"ids": np.zeros(shape, np.int64)}
        np.testing.assert_array_equal(run(original, feeds)[0], run(graphopt.to_bytes(model), feeds)[0])


def test_dims_that_other_nodes_also_read_are_left_as_they_are():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, seq, 64] x) => (float[batch, seq, 2, 32] y, int64 nb) {
        z = Flatten <axis = 0> (x)
        s0 = Shape <start = 0, end = 1> (x)
        s1 = Shape <start = 1, end = 2> (x)
        nb = Squeeze(s0)
        rest = Constant <value = int64[2] {2, 32}> ()
        shape = Concat <axis = 0> (s0, s1, rest)
        y = Reshape(z, shape)
    }
    """
    original, model, result = optimized(text)
    assert ops(model) == ["Flatten", "Shape", "Shape", "Squeeze", "Concat", "Reshape"]  # a new Shape would add one
    assert result.pipeline.stats["fold-shapes"].changes == 0


def test_two_unknown_dims_cannot_be_rewritten():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[a, b] x, float[c, d] w) => (float[c, d] y) {
        s = Shape(w)
        y = Reshape(x, s)
    }
    """
    original, model, result = optimized(text)
    assert ops(model) == ["Shape", "Reshape"]
    assert result.pipeline.stats["fold-shapes"].changes == 0
    check_two_shapes(original, model, {"x": [(2, 6), (4, 3)], "w": [(3, 4), (6, 2)]})


def test_shape_chain_inside_a_subgraph_reading_an_outer_value():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 64] x, bool c) => (float[batch, 2, 32] y) {
        y = If (c) <
            then_branch = t () => (float[batch, 2, 32] o1) {
                s = Shape(x)
                i0 = Constant <value = int64[1] {0}> ()
                b = Gather <axis = 0> (s, i0)
                rest = Constant <value = int64[2] {2, 32}> ()
                shape = Concat <axis = 0> (b, rest)
                o1 = Reshape(x, shape)
            },
            else_branch = e () => (float[batch, 2, 32] o2) {
                k = Constant <value = int64[3] {-1, 2, 32}> ()
                n = Neg(x)
                o2 = Reshape(n, k)
            }
        >
    }
    """
    original, model, _ = optimized(text)
    then_branch = node(model, "If").attr("then_branch")
    assert [n.op_type for n in then_branch] == ["Reshape"]
    assert next(iter(then_branch)).inputs[1].const.numpy().tolist() == [0, 2, 32]
    for c in (True, False):
        for n in (1, 3):
            feeds = {"x": np.ones((n, 64), np.float32), "c": np.array(c)}
            np.testing.assert_array_equal(run(original, feeds)[0], run(graphopt.to_bytes(model), feeds)[0])


# -- infer-shapes --------------------------------------------------------------------------------

SLICED = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[batch, seq] ids) => (float[1, s, 8] y) <float[64, 8] table = {...}> {
    s = Shape(ids)
    one = Constant <value = int64[1] {1}> ()
    two = Constant <value = int64[1] {2}> ()
    n = Slice(s, one, two)
    zero = Constant <value = int64[1] {0}> ()
    pos = Constant <value = int64[1, 64] {...}> ()
    p = Slice(pos, zero, n, one)
    y = Gather(table, p)
}
"""


def sliced_model() -> onnx.ModelProto:
    text = SLICED.replace("float[64, 8] table = {...}", "float[64, 8] table = {" + ",".join(["0.5"] * 512) + "}")
    return parse(text.replace("int64[1, 64] {...}", "int64[1, 64] {" + ",".join(map(str, range(64))) + "}"))


def test_infer_shapes_counts_what_became_more_specific_and_converges(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = graphopt.load(sliced_model())
    first = optimize(model, ["infer-shapes"], max_iterations=1).pipeline.stats["infer-shapes"].changes
    assert first > 0
    assert optimize(model, ["infer-shapes"]).pipeline.stats["infer-shapes"].changes == 0
    assert [v.shape for v in model.graph.inputs] == [("batch", "seq")]  # interface untouched
    values = {v.name: v for v in model.graph.values()}
    # onnxruntime's symbolic inference knows the slice keeps dim 0 (1) and dim 1 follows seq
    p_shape = values["p"].shape
    assert p_shape[0] == 1 and isinstance(p_shape[1], str) and "seq" in p_shape[1]
    assert os.listdir(tmp_path) == []  # the tool's own entry point would write a file here


def test_infer_shapes_without_symbolic_keeps_onnx_results_only():
    model = graphopt.load(sliced_model())
    result = optimize(model, ["infer-shapes"], config={"infer-shapes.symbolic": False})
    assert result.pipeline.stats["infer-shapes"].changes > 0
    values = {v.name: v for v in model.graph.values()}
    assert isinstance(values["s"].type, TensorType) and values["s"].shape == (2,)


@pytest.mark.parametrize("symbolic", [True, False])
def test_fold_shapes_runs_the_model_at_two_shapes_with_and_without_symbolic_inference(symbolic):
    original = sliced_model()
    model = graphopt.load(original)
    optimize(model, PIPELINE, config={"fold-shapes.symbolic": symbolic})
    for n in (16, 5):
        feeds = {"ids": np.zeros((2, n), np.int64)}
        np.testing.assert_array_equal(run(original, feeds)[0], run(graphopt.to_bytes(model), feeds)[0])
