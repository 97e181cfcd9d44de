"""Models that draw random numbers. onnxruntime seeds an unseeded random op from the process and the
node's index in its graph, so a rewrite that moves the op draws other numbers than the original; the
comparisons (verify, quantize's error measurements) give each random op the same seed in both models."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.onnx_io.walk import model_nodes
from graphopt.passes.quant import QuantConfig, quantize
from graphopt.verify import verify_models
from tests.helpers import parse

NOISY = """
<ir_version: 8, opset_import: ["" : 18]>
noisy (float[2, 8] x) => (float[2, 8] y, float[2, 8] kept) {
  a = Identity(x)
  zero = Constant<value = float {0.0}>()
  b = Add(a, zero)
  r = RandomUniformLike<dtype = 1>(b)
  y = Add(b, r)
  ratio = Constant<value = float {0.5}>()
  training = Constant<value = bool {1}>()
  kept, mask = Dropout(b, ratio, training)
}
"""


def test_a_rewrite_that_moves_random_ops_still_verifies(tmp_path):
    path = tmp_path / "noisy.onnx"
    onnx.save(parse(NOISY), path)
    optimized = graphopt.optimize(str(path)).model
    ops = [n.op_type for n in optimized.graph]
    assert ops.index("RandomUniformLike") < 3 and "Dropout" in ops  # moved up, so unseeded draws would differ
    report = verify_models(str(path), graphopt.to_bytes(optimized))
    assert report.ok, [(d.name, d.verdict, d.detail) for d in report.outputs]
    assert any("Dropout, RandomUniformLike" in note for note in report.notes)
    assert all(a.name != "seed" for n in onnx.load(path).graph.node for a in n.attribute)  # input untouched


def test_quantize_measures_its_error_with_the_originals_draws(tmp_path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{i}") for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomNormalLike", ["h"], ["noise"], dtype=TensorProto.FLOAT, scale=0.5),
         helper.make_node("Add", ["h", "noise"], ["sampled"]),
         helper.make_node("MatMul", ["sampled", "w2"], ["y"])],
        "sampler", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    calib = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(8)]
    for mode in ("static", "dynamic"):
        quantized, report = quantize(model, calib, QuantConfig(mode=mode, latency_aware=False))
        assert report.quantized_nodes >= 2, mode  # both MatMuls (and in static mode the Add)
        assert report.output_error["cosine"] > 0.999, (mode, report.output_error)
        # the seed was only for measuring: the quantized model draws fresh numbers, as the original does
        assert all(a.name != "seed" for n in model_nodes(graphopt.to_proto(quantized)) for a in n.attribute)
