"""The int8 layout rewrites of passes/quant/align.py: a stem's input channels padded for onnxruntime's int8
conv kernel (which convs qualify) and the classifier's Flatten in channels-last order; each model computes
exactly what it computed before."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

import graphopt
from graphopt.ir import verify
from graphopt.passes.quant import QuantConfig, quantize
from graphopt.passes.quant.align import has_conv_sym_kernels, input_convs_to_pad, pad_input_channels
from tests.passes.test_quant import ort_ops
from tests.passes.test_quant_units import RNG, make_model, samples, tensor

x86_only = pytest.mark.skipif(not has_conv_sym_kernels(), reason="padding is for x86's int8 conv kernel")


def conv_model(in_channels: int, out_channels: int, group: int = 1, inner: bool = False):
    """x -> [Relu ->] Conv(3x3) -> Relu -> y; ``inner``: the conv reads an activation, not the model input."""
    w = (RNG.standard_normal((out_channels, in_channels // group, 3, 3)) / 5).astype(np.float32)
    b = RNG.standard_normal(out_channels).astype(np.float32) / 10
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="pre")] if inner else []
    nodes += [helper.make_node("Conv", ["r" if inner else "x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=group,
                               name="conv"),
              helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", [1, in_channels, 8, 8])], [tensor("y", [1, out_channels, 8, 8])],
                      {"w": w, "b": b}, opset=13)


def quantized(proto):
    calib = samples(tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim))
    model, _ = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False))
    return model, calib


@x86_only
@pytest.mark.parametrize("in_channels", [1, 3, 6])
def test_padding_changes_no_output_and_keeps_the_int8_conv(in_channels):
    model, calib = quantized(conv_model(in_channels, 16))
    before = graphopt.to_bytes(model)
    assert pad_input_channels(model) == ["conv"]
    after = graphopt.to_bytes(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].producer.inputs[0].shape == (16, in_channels + (-in_channels % 4), 3, 3)
    pad = next(n for n in model.graph if n.op_type == "Pad")
    assert pad.inputs[0].producer.op_type == "QuantizeLinear"  # padded in uint8, with the zero point
    verify(model)  # use lists, names and order still well formed
    a, b = ort.InferenceSession(before), ort.InferenceSession(after)
    for feed in calib[:4]:
        np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])
    assert "QLinearConv" in ort_ops(after) and "Conv" not in ort_ops(after)


@x86_only
@pytest.mark.parametrize("in_channels, out_channels, group, inner", [
    (4, 16, 1, False),   # already a multiple of 4
    (3, 8, 1, False),    # too few output channels for the kernel: padding buys nothing
    (3, 20, 1, False),   # output channels not a multiple of 8
    (6, 18, 3, False),   # grouped
    (3, 16, 1, True),    # reads an activation, not the model input
])
def test_convs_the_kernel_would_not_take_are_left_alone(in_channels, out_channels, group, inner):
    model, _ = quantized(conv_model(in_channels, out_channels, group, inner))
    assert input_convs_to_pad(model) == [] and pad_input_channels(model) == []
    assert not any(n.op_type == "Pad" for n in model.graph)


@x86_only
def test_int8_activations_are_not_padded():
    """Their S8S8 kernels round differently with and without padding; only uint8 ones give the same outputs."""
    proto = conv_model(3, 16)
    calib = samples((1, 3, 8, 8))
    model, _ = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False, activation_type="int8"))
    assert input_convs_to_pad(model) == [] and pad_input_channels(model) == []
    assert not any(n.op_type == "Pad" for n in model.graph)


@x86_only
@pytest.mark.parametrize("name", ["resnet_dynamo", "mobilenet_torchscript"])
def test_exported_stems_are_padded_exactly(zoo, name):
    calib = [zoo.make_inputs(zoo.MODELS[name], seed=i) for i in range(4)]
    model, _ = quantize(str(zoo.build(name)), calib, QuantConfig(latency_aware=False))
    before = graphopt.to_bytes(model)
    assert len(pad_input_channels(model)) == 1
    a, b = ort.InferenceSession(before), ort.InferenceSession(graphopt.to_bytes(model))
    for feed in calib:
        np.testing.assert_array_equal(a.run(None, feed)[0], b.run(None, feed)[0])


def classifier_model(flatten: str, linear: str, spatial: int = 2):
    """x -> Conv -> Relu -> MaxPool -> Flatten|Reshape -> Gemm(transB=1)|Gemm|MatMul -> y."""
    channels, features = 8, 8 * spatial * spatial
    w = (RNG.standard_normal((channels, 3, 3, 3)) / 5).astype(np.float32)
    fc = (RNG.standard_normal((10, features)) / 5).astype(np.float32)
    inits = {"w": w, "fc": fc if linear == "gemm_t" else np.ascontiguousarray(fc.T)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    if flatten == "flatten":
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flat"))
    else:
        inits["shape"] = np.array([-1, features], np.int64)
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"))
    nodes.append(helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc") if linear == "matmul" else
                 helper.make_node("Gemm", ["f", "fc"], ["y"], transB=int(linear == "gemm_t"), name="fc"))
    return make_model(nodes, [tensor("x", [1, 3, 2 * spatial, 2 * spatial])], [tensor("y", [1, 10])], inits)


@pytest.mark.parametrize("flatten, linear, spatial", [("flatten", "gemm_t", 2), ("reshape", "gemm", 2),
                                                      ("flatten", "matmul", 2), ("flatten", "gemm_t", 1)])
def test_flatten_channels_last_is_exact_and_saves_a_transpose(monkeypatch, flatten, linear, spatial):
    proto = classifier_model(flatten, linear, spatial)
    calib = samples((1, 3, 2 * spatial, 2 * spatial))
    config = QuantConfig(latency_aware=False)  # fusing also infers the shapes the rewrite reads
    rewritten, _ = quantize(proto, calib, config)
    monkeypatch.setattr("graphopt.passes.quant.api.flatten_channels_last", lambda model: [])
    plain, _ = quantize(proto, calib, config)
    a, b = graphopt.to_bytes(plain), graphopt.to_bytes(rewritten)
    verify(rewritten)
    assert [n.op_type for n in rewritten.graph].count("Transpose") == 1
    assert not any(n.op_type == "Transpose" for n in plain.graph)
    assert ort_ops(b)["Transpose"] == ort_ops(a)["Transpose"] - 1  # onnxruntime's own one back to NCHW is gone
    sa, sb = ort.InferenceSession(a), ort.InferenceSession(b)
    for feed in calib[:4]:
        np.testing.assert_array_equal(sa.run(None, feed)[0], sb.run(None, feed)[0])


def test_flatten_after_a_float_op_is_left_alone():
    """With the conv and pool float, the Flatten's input is NCHW in onnxruntime: a Transpose would cost a node."""
    proto = classifier_model("flatten", "gemm_t")
    model, report = quantize(proto, samples((1, 3, 4, 4)), QuantConfig(latency_aware=False,
                                                                      nodes_to_exclude=["conv", "pool"]))
    assert report.quantized_nodes == 1  # the classifier alone
    assert not any(n.op_type == "Transpose" for n in model.graph)
