"""Shape inference into the IR (graphopt.shapes): what it may and may not claim about dims."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import Node
from graphopt.shapes import infer_shapes
from tests.helpers import parse, run

RANGE = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64 n1, int64 n2) => (int64 total) {
    zero = Constant <value = int64 {0}> ()
    one = Constant <value = int64 {1}> ()
    x = Range(zero, n1, one)
    total = ReduceSum <keepdims = 0> (x)
}
"""


def test_names_invented_by_two_inferences_never_alias_two_different_dims():
    """onnx names each unknown dim ``unk__N`` afresh on every run, counting from the same start. A value
    typed by an earlier run keeps its name, so a later run's name must not claim another value's dim is
    that size: onnxruntime plans buffers by dim names and fails when two such tensors differ."""
    model = graphopt.load(parse(RANGE))
    infer_shapes(model)
    values = {v.name: v for v in model.graph.values()}
    (x_dim,) = values["x"].shape
    assert isinstance(x_dim, str)
    # a new Range (over n2) placed before x's: the next run reaches it first
    x_node = values["x"].producer
    y_node = Node("Range", [values["zero"], values["n2"], values["one"]], outputs=["y"])
    w_node = Node("Mul", [y_node.outputs[0], y_node.outputs[0]], outputs=["w"])
    model.graph.insert_before(x_node, [y_node, w_node])
    model.graph.outputs.append(w_node.outputs[0])
    infer_shapes(model)
    (y_dim,) = y_node.outputs[0].shape
    (w_dim,) = w_node.outputs[0].shape
    assert isinstance(y_dim, str) and y_dim == w_dim  # what one run proves stays: w has y's length
    assert y_dim != x_dim
    feeds = {"n1": np.array(3, np.int64), "n2": np.array(5, np.int64)}
    total, w = run(graphopt.to_bytes(model), feeds)
    assert total == 3
    np.testing.assert_array_equal(w, np.arange(5) ** 2)


def test_array_feature_extractor_keeps_the_reshape_after_it():
    """ArrayFeatureExtractor on 1-D data returns [1, all indices] (what onnxruntime computes); onnxruntime's
    symbolic inference says indices.shape, which made the Reshape back to [-1, 3] look like a no-op
    (skl2onnx's KNeighborsClassifier: every label came out for the first row only)."""
    graph = helper.make_graph(
        [helper.make_node("ArrayFeatureExtractor", ["labels", "idx"], ["z"], domain="ai.onnx.ml"),
         helper.make_node("Reshape", ["z", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
        [numpy_helper.from_array(np.arange(10, 160, dtype=np.int64), "labels"),
         numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    idx = np.arange(24, dtype=np.int64).reshape(8, 3)
    optimized = graphopt.optimize(model).model
    (y,) = run(graphopt.to_bytes(optimized), {"idx": idx})
    np.testing.assert_array_equal(y, idx + 10)
