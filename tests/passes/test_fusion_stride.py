"""FFN inner-width padding (passes/fusion/stride.py), checked against onnxruntime running the original."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.passes.fusion.stride import PAD, PadAliasedFfn
from graphopt.verify import verify_models
from tests.passes.test_fusion_support import assert_same_outputs, model_from, not_fired, ops, optimized, rand

FFN = """
<ir_version: 8, opset_import: ["" : 20, "com.microsoft" : 1]>
g (float[N, 8, 32] x) => (float[N, 8, 24] y) {
    h = MatMul(x, w1)
    ACT
    y = MatMul(a, w2)
}
"""


def _ffn(act: str, width: int, bias: bool = True):
    weights = {"w1": rand(32, width, seed=1), "w2": rand(width, 24, seed=2, low=-0.1, high=0.1)}
    if bias:
        weights["b"] = rand(width, seed=3)
    return model_from(FFN.replace("ACT", act), weights)


@pytest.mark.parametrize(("act", "bias"), [
    ("a = com.microsoft.BiasGelu(h, b)", True),
    ("a = com.microsoft.FastGelu(h, b)", True),
    ("a = com.microsoft.QuickGelu <alpha = 1.702> (h)", False),
    ("a = Gelu(h)", False),
    ("a = Relu(h)", False),
])
def test_ffn_of_width_1024_is_padded_and_matches(act, bias):
    proto = _ffn(act, 1024, bias)
    model = optimized(proto, ["pad-aliased-ffn"])
    first, second = (n for n in model.graph if n.op_type == "MatMul")
    assert first.inputs[1].const.shape == (32, 1024 + PAD) and second.inputs[1].const.shape == (1024 + PAD, 24)
    assert not second.inputs[1].const.numpy()[1024:].any()  # the padding rows weigh zero
    activation = next(n for n in model.graph if n.op_type != "MatMul")
    assert activation.attrs == _node_attrs(proto, activation.op_type)  # QuickGelu keeps its alpha
    if bias:
        assert activation.inputs[1].const.shape == (1024 + PAD,)
    assert_same_outputs(proto, model, {"x": rand(3, 8, 32, seed=4)})


def _node_attrs(proto, op_type: str) -> dict:
    model = optimized(proto, [])
    return next(n for n in model.graph if n.op_type == op_type).attrs


def test_widths_whose_rows_do_not_alias_are_left_alone():
    why = not_fired(_ffn("a = com.microsoft.BiasGelu(h, b)", 1536), PadAliasedFfn, "pad-ffn-bias-gelu")
    assert "1536 is not a multiple of 1024" in why


def test_weights_shared_by_two_layers_are_not_copied():
    text = FFN.replace("y = MatMul(a, w2)", "m = MatMul(a, w2)\n    h2 = MatMul(m, w1)\n    a2 = Relu(h2)\n"
                       "    y = MatMul(a2, w2)").replace("ACT", "a = Relu(h)")
    proto = model_from(text.replace("float[N, 8, 24] y", "float[N, 8, 32] y"),
                       {"w1": rand(32, 1024), "w2": rand(1024, 32)})
    why = not_fired(proto, PadAliasedFfn, "pad-ffn-onnx-activation")
    assert "also read elsewhere" in why


def test_an_activation_read_elsewhere_is_not_widened():
    text = FFN.replace("=> (float[N, 8, 24] y)", "=> (float[N, 8, 24] y, float[N, 8, 1024] a)")
    proto = model_from(text.replace("ACT", "a = Relu(h)"), {"w1": rand(32, 1024), "w2": rand(1024, 24)})
    model = optimized(proto, ["pad-aliased-ffn"])
    assert ops(model) == ["MatMul", "Relu", "MatMul"]
    assert all(n.inputs[1].const.shape[-1] in (1024, 24) for n in model.graph if n.op_type == "MatMul")


@pytest.mark.slow
def test_bert_base_ffns_are_padded_by_the_default_pipeline(zoo):
    path = zoo.build("bert_base_torchscript")
    model = graphopt.load(path)
    graphopt.optimize(model)
    padded = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const is not None
              and n.inputs[1].const.shape[0] == 3072 + PAD]
    assert len(padded) == 12  # every layer's second projection
    feeds = zoo.make_inputs(zoo.MODELS["bert_base_torchscript"])
    report = verify_models(str(path), graphopt.to_bytes(model), inputs=feeds)
    assert report.ok, report.summary()
