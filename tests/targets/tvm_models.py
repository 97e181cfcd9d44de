"""Small ONNX models and onnxruntime references for the TVM target tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper


def conv_net(channels: int = 8, size: int = 16, batch: int | str = "N") -> onnx.ModelProto:
    """Conv3x3 + Relu + MaxPool + Flatten + Gemm, batch dim ``batch`` (symbolic by default)."""
    rng = np.random.default_rng(0)
    flat = channels * (size // 2) ** 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1, name="fc")],
        "net", [helper.make_tensor_value_info("x", T.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", T.FLOAT, [batch, 10])],
        [numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "B"),
         numpy_helper.from_array(rng.standard_normal((10, flat)).astype(np.float32) / np.float32(np.sqrt(flat)), "G"),
         numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "C")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_layer(channels: int = 32, size: int = 32) -> onnx.ModelProto:
    """One static Conv3x3 + Relu: a single tuning task whose untuned loop nest is slow."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "layer", [helper.make_tensor_value_info("x", T.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, channels, size, size])],
        [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) / 10, "W"),
         numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_outputs(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def assert_matches(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float = 1e-4,
                   atol: float = 1e-5) -> None:
    """Every reference output present and within fp32 tolerance (the verify module's rule)."""
    from graphopt.verify import compare_outputs

    assert set(ref) <= set(got), (sorted(ref), sorted(got))
    diffs = compare_outputs(ref, got, rtol, atol)
    assert all(d.ok for d in diffs), [(d.name, d.verdict, d.max_abs, d.max_rel) for d in diffs]
