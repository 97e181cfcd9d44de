"""FFN inner-width padding (passes/fusion/stride.py), checked against onnxruntime running the original."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import graphopt
from graphopt.passes.fusion.stride import PAD, PadAliasedFfn
from graphopt.verify import verify_models
from tests.passes.test_fusion_support import assert_same_outputs, model_from, not_fired, ops, optimized, rand, reason

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


GEMM_FFN = """
<ir_version: 8, opset_import: ["" : 20, "com.microsoft" : 1]>
g (float[N, 32] x) => (float[N, 24] y) {
    h = Gemm <transB = TRANSB> (x, w1, c1)
    a = com.microsoft.FastGelu(h)
    y = Gemm <transB = TRANSB> (a, w2, c2)
}
"""


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_ffn_is_padded_along_either_weight_layout(trans_b):
    w1, w2 = rand(32, 1024, seed=1), rand(1024, 24, seed=2, low=-0.1, high=0.1)
    weights = {"w1": w1.T if trans_b else w1, "w2": w2.T if trans_b else w2, "c1": rand(1024, seed=3),
               "c2": rand(24, seed=4)}
    proto = model_from(GEMM_FFN.replace("TRANSB", str(trans_b)), weights)
    model = optimized(proto, ["pad-aliased-ffn"])
    first, second = (n for n in model.graph if n.op_type == "Gemm")
    wide = 1024 + PAD
    assert first.inputs[1].const.shape == ((wide, 32) if trans_b else (32, wide))
    assert first.inputs[2].const.shape == (wide,) and second.inputs[1].const.shape == ((24, wide) if trans_b
                                                                                       else (wide, 24))
    assert second.inputs[2].name == "c2"  # the output's bias is not touched
    assert_same_outputs(proto, model, {"x": rand(5, 32, seed=5)})


# GPT-2's TorchScript FFN: 2-D Gemms around a 3-D activation, whose leading dims a Shape reads for the output
RESHAPED_FFN = """
<ir_version: 8, opset_import: ["" : 20, "com.microsoft" : 1]>
g (float[N, S, 32] x) => (float[N, S, 24] y, int64[K] k) {
    x2 = Reshape(x, flat)
    h = Gemm(x2, w1, c1)
    lead = Shape <end = 2> (x)
    s1 = Concat <axis = 0> (lead, width)
    h3 = Reshape(h, s1)
    a = com.microsoft.FastGelu(h3)
    a2 = Reshape(a, back)
    o = Gemm(a2, w2, c2)
    lead2 = Shape <end = END> (a)
    s2 = Concat <axis = 0> (lead2, out)
    y = Reshape(o, s2)
    k = Shape <K_RANGE> (a)
}
"""


def _reshaped_ffn(end: int, k_range: str):
    weights = {"w1": rand(32, 1024, seed=1), "c1": rand(1024, seed=2), "w2": rand(1024, 24, seed=3, low=-0.1,
               high=0.1), "c2": rand(24, seed=4), "flat": np.array([-1, 32]), "width": np.array([1024]),
               "back": np.array([-1, 1024]), "out": np.array([24])}
    return model_from(RESHAPED_FFN.replace("END", str(end)).replace("K_RANGE", k_range), weights)


@pytest.mark.parametrize("end", [2, -1])
def test_ffn_reshaped_around_its_activation_is_padded_through_the_reshapes(end):
    proto = _reshaped_ffn(end, "end = 1")
    model = optimized(proto, ["infer-shapes", "pad-aliased-ffn"])
    assert [n.inputs[1].const.shape for n in model.graph if n.op_type == "Gemm"] == [(32, 1024 + PAD),
                                                                                     (1024 + PAD, 24)]
    (gelu,) = [n for n in model.graph if n.op_type == "FastGelu"]
    assert sorted(u.op_type for u in gelu.outputs[0].users()) == ["Reshape", "Shape", "Shape"]  # moved over
    assert_same_outputs(proto, model, {"x": rand(2, 5, 32, seed=5)})


def test_a_shape_read_of_the_activations_last_axis_keeps_the_ffn():
    proto = _reshaped_ffn(2, "start = 2")  # k = the inner width, which padding would change
    model = optimized(proto, ["infer-shapes"])
    assert PadAliasedFfn.rules.apply(model) == {}
    assert "reads the activation's last axis" in reason(model, PadAliasedFfn, "pad-ffn-gelu-reshaped")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_exported_gpt2_ffns_are_padded_and_match(zoo, tmp_path, exporter):
    """A 1-layer GPT-2 of the zoo's size with a 1024-wide FFN, as each exporter writes it (TorchScript:
    Gemm, Reshape, FastGelu, Reshape, Gemm and a Shape; dynamo: Gemm, FastGelu, Gemm)."""
    base = zoo.MODELS[f"gpt2_{exporter}"]
    spec = dataclasses.replace(base, name=f"{base.name}_ffn1024",
                               config={**base.config, "hf": {**base.config["hf"], "n_inner": 1024, "n_layer": 1}})
    path = tmp_path / "gpt2.onnx"
    spec.builder(spec, path)
    model = graphopt.load(path)
    graphopt.optimize(model)
    assert [n.inputs[1].const.shape for n in model.graph if n.op_type == "Gemm"][-1] == (1024 + PAD, 64)
    for second in (False, True):
        report = verify_models(str(path), graphopt.to_bytes(model), inputs=zoo.make_inputs(spec, second=second))
        assert report.ok, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "projection"), [("bert_base_torchscript", "MatMul"),
                                                  ("gpt2_base_torchscript", "Gemm")])
def test_base_size_ffns_are_padded_by_the_default_pipeline(zoo, name, projection):
    path = zoo.build(name)
    model = graphopt.load(path)
    graphopt.optimize(model)
    padded = [n for n in model.graph if n.op_type == projection and n.inputs[1].const is not None
              and n.inputs[1].const.shape[0] == 3072 + PAD]
    assert len(padded) == 12  # every layer's second projection
    report = verify_models(str(path), graphopt.to_bytes(model), inputs=zoo.make_inputs(zoo.MODELS[name]))
    assert report.ok, report.summary()
