"""onnx-graphsurgeon bridge: a graphopt model goes through graphsurgeon's own passes and back."""

from __future__ import annotations

import numpy as np

import graphopt
from graphopt.interop import from_graphsurgeon, to_graphsurgeon
from graphopt.ir import verify
from tests.helpers import parse, run

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[2] y) {
    a = Constant <value = float[2] {1.0, 2.0}> ()
    b = Constant <value = float[2] {3.0, 4.0}> ()
    c = Add(a, b)
    y = Mul(x, c)
}
"""


def test_graphsurgeon_round_trip_with_its_constant_folding():
    original = parse(MODEL)
    graph = to_graphsurgeon(graphopt.load(original))
    graph.fold_constants().cleanup()
    model = from_graphsurgeon(graph)
    verify(model)
    assert [n.op_type for n in model.graph] == ["Mul"]
    x = {"x": np.array([1.0, -1.0], np.float32)}
    np.testing.assert_array_equal(run(original, x)[0], run(graphopt.to_bytes(model), x)[0])
