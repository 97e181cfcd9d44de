"""Shape inference into the IR (graphopt.shapes): what it may and may not claim about dims."""

from __future__ import annotations

import numpy as np

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
