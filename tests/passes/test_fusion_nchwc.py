"""NCHWc layout (passes/fusion/nchwc.py): ORT_ENABLE_ALL's CPU conv layout written by graphopt, for
``--target-runtime ort-cpu`` only; outputs checked against onnxruntime running the original."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt.ir import verify
from graphopt.passes.fusion.nchwc import NCHWC, block_size, reorder_filter
from tests.passes.test_fusion_support import assert_same_outputs, model_from, rand

BLOCK = block_size()
needs_nchwc = pytest.mark.skipif(BLOCK is None, reason="onnxruntime uses no NCHWc layout on this CPU")

# a residual block as exporters write it after BN folding: conv-relu-conv + shortcut, add, relu, pools
RESIDUAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 16, 16] x) => (float[N, 16, 1, 1] y, float[N, 16, 8, 8] side) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
    r = Relu(a)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    c1 = Conv <pads = [1, 1, 1, 1]> (p, w1, b1)
    r1 = Relu(c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2)
    s = Add(c2, p)
    side = Relu(s)
    d = Conv <group = 16, pads = [1, 1, 1, 1]> (side, wd, bd)
    c6 = Clip(d, lo, hi)
    y = GlobalAveragePool(c6)
}
"""


def _weights() -> dict[str, np.ndarray]:
    return {"w0": rand(16, 3, 3, 3, seed=1), "b0": rand(16, seed=2), "w1": rand(16, 16, 3, 3, seed=3),
            "b1": rand(16, seed=4), "w2": rand(16, 16, 3, 3, seed=5), "wd": rand(16, 1, 3, 3, seed=6),
            "bd": rand(16, seed=7), "lo": np.float32(0), "hi": np.float32(6)}


def _optimize(proto: onnx.ModelProto, target: str):
    model = graphopt.load(proto)
    graphopt.optimize(model, ["lift-constants", "infer-shapes", "nchwc-layout", "eliminate-dead-nodes",
                              "remove-unused-initializers"], target_runtime=target)
    verify(model)
    return model


def _run(model, feeds, level: str) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(graphopt.to_bytes(model), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_reorder_filter_layouts():
    w = np.arange(16 * 8 * 1 * 1, dtype=np.float32).reshape(16, 8, 1, 1)
    both = reorder_filter(w, 8, blocked_input=True).reshape(2, 1, 1, 1, 8, 8)  # [O/B, I/B, H, W, Bi, Bo]
    assert both[1, 0, 0, 0, 3, 5] == w[8 + 5, 3, 0, 0]
    out_only = reorder_filter(w, 8, blocked_input=False).reshape(2, 8, 1, 1, 8)  # [O/B, I, H, W, Bo]
    assert out_only[1, 3, 0, 0, 5] == w[8 + 5, 3, 0, 0]


@needs_nchwc
def test_residual_block_is_laid_out_like_ort_enable_all_and_matches():
    proto = model_from(RESIDUAL, _weights())
    model = _optimize(proto, "ort-cpu")
    counts = collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph)
    assert counts == {f"{NCHWC}::Conv": 4, f"{NCHWC}::MaxPool": 1, f"{NCHWC}::GlobalAveragePool": 1,
                      f"{NCHWC}::ReorderOutput": 2}, counts
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs[0].inputs[0].name == "x"  # 3 channels: the first conv reads the NCHW image itself
    assert [c.attr("activation") for c in convs] == ["Relu", "Relu", "Relu", "Clip"]
    assert list(convs[3].attr("activation_params")) == [0.0, 6.0]
    assert len(convs[2].inputs) == 4  # the residual Add became the conv's Sum input (a zero bias added)
    assert [v.name for v in model.graph.outputs] == ["y", "side"]
    feeds = {"x": rand(2, 3, 16, 16, seed=9)}
    assert_same_outputs(proto, model, feeds)
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC"):  # the kernels run at every level
        for got, want in zip(_run(model, feeds, level), _run(graphopt.load(proto), feeds, "ORT_DISABLE_ALL"),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())  # summation order


def test_default_target_stays_portable():
    model = _optimize(model_from(RESIDUAL, _weights()), "ort")
    assert not any(n.domain == NCHWC for n in model.graph)
    assert NCHWC not in model.opset_imports


@needs_nchwc
def test_channel_counts_off_the_block_are_padded_and_cropped():
    """12 and 20 channels (a multiple of neither 8 nor 16) run blocked with zero-padded filters; Sigmoid
    leaves 0.5 in the padding channels, which must not reach a real channel or an output."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 16, 8, 8] x, float[16, 16, 3, 3] wx) => (float[1, 20, 1, 1] y, float[1, 12, 8, 8] mid,
                                                          float[1, 16, 8, 8] z) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w12, b12)
        s = Sigmoid(a)
        d = Conv <group = 12, pads = [1, 1, 1, 1]> (s, wd, bd)
        mid = Relu(d)
        c = Conv (mid, w20)
        e = Conv (s, w20b, b20)
        r = Add(c, e)
        y = GlobalAveragePool(r)
        z = Conv <pads = [1, 1, 1, 1]> (x, wx)
    }
    """
    proto = model_from(text, {"w12": rand(12, 16, 3, 3, seed=1), "b12": rand(12, seed=2),
                              "wd": rand(12, 1, 3, 3, seed=3), "bd": rand(12, seed=4),
                              "w20": rand(20, 12, 1, 1, seed=5), "w20b": rand(20, 12, 1, 1, seed=6),
                              "b20": rand(20, seed=7)})
    model = _optimize(proto, "ort-cpu")
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert [n.domain for n in convs].count(NCHWC) == 4  # wx is a graph input: that conv stays NCHW
    padded = -(-20 // BLOCK) * BLOCK
    assert sorted(n.inputs[1].const.shape[0] for n in convs if n.domain == NCHWC) == sorted(
        [-(-12 // BLOCK) * BLOCK] * 2 + [padded] * 2)
    depthwise = next(n for n in convs if n.attr("group", 1) > 1)
    assert depthwise.attr("group") == -(-12 // BLOCK) * BLOCK
    assert sorted(n.attr("channels") for n in model.graph if n.op_type == "ReorderOutput") == [12, 20]
    feeds = {"x": rand(1, 16, 8, 8, seed=8), "wx": rand(16, 16, 3, 3, seed=9)}
    assert_same_outputs(proto, model, feeds)


CNNS = ["digits_cnn_torchscript", "digits_cnn_dynamo", "resnet_torchscript", "resnet_dynamo", "mobilenet_torchscript",
        "mobilenet_dynamo"]


@needs_nchwc
@pytest.mark.parametrize("name", [*CNNS, *(pytest.param(n, marks=pytest.mark.slow) for n in
                                           ("resnet50_torchscript", "mobilenet_v2_torchscript"))])
def test_zoo_cnns_with_the_default_pipeline(name):
    """The whole default pipeline for ort-cpu: every conv is laid out (as onnxruntime's ALL level does), and the
    outputs match the original at the zoo's two input shapes."""
    from tools.zoo import MODELS, build, make_inputs

    path = build(name)
    model = graphopt.load(path)
    graphopt.optimize(model, target_runtime="ort-cpu")
    verify(model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    assert convs and all(n.domain == NCHWC for n in convs)  # any channel count: padded to whole blocks
    for second in (False, True):
        assert_same_outputs(str(path), model, make_inputs(MODELS[name], second=second))
