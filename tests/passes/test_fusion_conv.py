"""Conv fusions (passes/fusion/conv.py): BatchNormalization, per-channel Mul/Add and Pad folded into Conv.

Every positive case is checked against onnxruntime running the original on random inputs; every rule has
negative cases asserting the reason it gives for not firing.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.passes.fusion.conv import CONV_OPS, FoldConvBatchNorm, FoldConvScaleBias, FusePadConv
from tests.passes.test_fusion_support import (
    assert_same_outputs,
    model_from,
    not_fired,
    ops,
    optimized,
    positive,
    rand,
)
from tools.zoo import MODELS, build, make_inputs

HEADER = '<ir_version: 8, opset_import: ["" : 18]>'


def _bn_weights(m: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"scale": rand(m, seed=seed), "bias": rand(m, seed=seed + 1), "mean": rand(m, seed=seed + 2),
            "var": positive(m, seed=seed + 3)}


# -- conv-batchnorm --------------------------------------------------------------------------------------------------
CONV_CASES = {  # id: (op, C, M, group, spatial, with bias, extra attributes)
    "conv2d": ("Conv", 4, 6, 1, (7, 6), True, "pads = [1, 1, 1, 1]"),
    "conv2d-no-bias": ("Conv", 4, 6, 1, (7, 6), False, "strides = [2, 2]"),
    "grouped": ("Conv", 4, 6, 2, (5, 5), True, ""),
    "depthwise": ("Conv", 6, 6, 6, (5, 5), False, "pads = [1, 1, 1, 1]"),
    "conv1d": ("Conv", 3, 5, 1, (9,), True, ""),
    "conv3d": ("Conv", 2, 3, 1, (4, 4, 4), False, ""),
    "convtranspose": ("ConvTranspose", 4, 6, 1, (5, 5), True, "strides = [2, 2]"),
    "convtranspose-grouped": ("ConvTranspose", 4, 6, 2, (5, 5), False, "strides = [2, 2], output_padding = [1, 1]"),
    "convtranspose-depthwise": ("ConvTranspose", 4, 4, 4, (5, 5), True, ""),
}


def _conv_model(case: str, tail: str = "y = BatchNormalization <epsilon = 0.001> (c, scale, bias, mean, var)",
                weights: dict | None = None, outputs: str = "float y"):
    op, c, m, group, spatial, bias, extra = CONV_CASES[case]
    kernel = (3,) * len(spatial)
    shape = (m, c // group, *kernel) if op == "Conv" else (c, m // group, *kernel)
    attrs = ", ".join(a for a in (f"group = {group}", extra) if a)
    dims = ", ".join(map(str, spatial))
    text = f"""{HEADER}
    g (float[N, {c}, {dims}] x) => ({outputs}) {{
        c = {op} <{attrs}> (x, w{', b' if bias else ''})
        {tail}
    }}"""
    all_weights = {"w": rand(*shape, seed=3), **_bn_weights(m)}
    if bias:
        all_weights["b"] = rand(m, seed=4)
    all_weights.update(weights or {})
    feeds = {"x": rand(2, c, *spatial, seed=5)}
    return model_from(text, all_weights), feeds


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_batchnorm_folds(case):
    proto, feeds = _conv_model(case)
    model = optimized(proto, ["fold-conv-batchnorm"])
    assert ops(model) == [CONV_CASES[case][0]]
    assert model.graph.outputs[0].name == "y"
    assert_same_outputs(proto, model, feeds)


def test_conv_batchnorm_refuses_training_mode():
    proto, _ = _conv_model("conv2d", "y, rm, rv = BatchNormalization <training_mode = 1> (c, scale, bias, mean, var)",
                           outputs="float[N, 6, 7, 6] y")
    assert "attribute training_mode=1" in not_fired(proto, FoldConvBatchNorm, "conv-batchnorm")


def test_conv_batchnorm_refuses_statistics_that_are_inputs():
    text = f"""{HEADER}
    g (float[N, 4, 5, 5] x, float[6] var) => (float y) {{
        c = Conv (x, w)
        y = BatchNormalization (c, scale, bias, mean, var)
    }}"""
    weights = _bn_weights(6)
    del weights["var"]
    proto = model_from(text, {"w": rand(6, 4, 3, 3), **weights})
    assert "expected a constant, got 'var'" in not_fired(proto, FoldConvBatchNorm, "conv-batchnorm")


@pytest.mark.parametrize(("tail", "outputs", "why"), [
    ("y = BatchNormalization (c, scale, bias, mean, var)\n        z = Relu(c)", "float y, float z",
     "'c' (from <unnamed Conv -> c>) is also used by <unnamed Relu -> z>"),
    ("y = BatchNormalization (c, scale, bias, mean, var)", "float y, float c", "'c' (from <unnamed Conv -> c>) is a "
     "graph output"),
])
def test_conv_batchnorm_refuses_a_conv_read_elsewhere(tail, outputs, why):
    proto, _ = _conv_model("conv2d", tail, outputs=outputs)
    assert why in not_fired(proto, FoldConvBatchNorm, "conv-batchnorm")


def test_conv_batchnorm_refuses_a_weight_that_is_an_input():
    text = f"""{HEADER}
    g (float[N, 4, 5, 5] x, float[6, 4, 3, 3] w) => (float y) {{
        c = Conv (x, w)
        y = BatchNormalization (c, scale, bias, mean, var)
    }}"""
    proto = model_from(text, _bn_weights(6))
    assert "expected a constant, got 'w'" in not_fired(proto, FoldConvBatchNorm, "conv-batchnorm")


# -- conv-mul / conv-div / conv-add / conv-sub ------------------------------------------------------------------------
AFFINE_CASES = {  # id: (ONNX line reading c, constant shape, rule)
    "mul-vector": ("y = Mul(c, k)", (6, 1, 1), "conv-mul"),
    "mul-scalar-first": ("y = Mul(k, c)", (), "conv-mul"),
    "div-4d": ("y = Div(c, k)", (1, 6, 1, 1), "conv-div"),
    "add-vector-first": ("y = Add(k, c)", (6, 1, 1), "conv-add"),
    "add-scalar": ("y = Add(c, k)", (1,), "conv-add"),
    "sub-vector": ("y = Sub(c, k)", (1, 6, 1, 1), "conv-sub"),
}


@pytest.mark.parametrize("case", list(AFFINE_CASES))
@pytest.mark.parametrize("conv", ["conv2d", "conv2d-no-bias", "depthwise", "convtranspose-grouped"])
def test_conv_scale_bias_folds(case, conv):
    line, shape, rule = AFFINE_CASES[case]
    m = CONV_CASES[conv][2]
    shape = tuple(m if d == 6 else d for d in shape)
    proto, feeds = _conv_model(conv, line, {"k": positive(*shape, seed=7)})
    model = graphopt.load(proto)
    counts = FoldConvScaleBias.rules.apply(model)
    assert counts == {rule: 1}
    assert ops(model) == [CONV_CASES[conv][0]]
    assert_same_outputs(proto, model, feeds)


def test_conv_scale_and_shift_chain_becomes_one_conv():
    line = "s = Mul(c, k)\n        y = Add(s, d)"
    proto, feeds = _conv_model("conv2d", line, {"k": rand(6, 1, 1, seed=8), "d": rand(6, 1, 1, seed=9)})
    model = optimized(proto, ["fold-conv-scale-bias"])
    assert ops(model) == ["Conv"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("line", "k", "rule", "why"), [
    ("y = Mul(c, k)", rand(1, 1, 7, 6), "conv-mul", "varies along axis 2"),
    ("y = Add(c, k)", rand(2, 6, 1, 1), "conv-add", "varies along axis 0"),
    ("y = Mul(c, k)", rand(1, 1, 1, 6, 1, 1), "conv-mul", "more dimensions than the output"),
    ("y = Div(c, k)", np.array([1, 0, 2, 3, 4, 5], np.float32).reshape(6, 1, 1), "conv-div", "holding zeros"),
    ("y = Mul(c, k)", np.array(np.inf, np.float32), "conv-mul", "NaN or Inf"),
    ("y = Sub(k, c)", rand(6, 1, 1), "conv-sub", "expected the output of Conv|ConvTranspose, got a constant"),
])
def test_conv_scale_bias_refuses(line, k, rule, why):
    proto, _ = _conv_model("conv2d", line, {"k": k})
    assert why in not_fired(proto, FoldConvScaleBias, rule)


# -- pad-conv --------------------------------------------------------------------------------------------------------
def _pad_model(pad_line: str, conv_attrs: str = "", weights: dict | None = None, opset: int = 18):
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, 3, 9, 8] x) => (float y) {{
        p = {pad_line}
        y = Conv {f"<{conv_attrs}>" if conv_attrs else ""} (p, w, b)
    }}"""
    all_weights = {"w": rand(4, 3, 3, 3, seed=2), "b": rand(4, seed=3), **(weights or {})}
    return model_from(text, all_weights), {"x": rand(2, 3, 9, 8, seed=4)}


PADS = np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)


@pytest.mark.parametrize(("pad_line", "conv_attrs", "weights", "opset"), [
    ("Pad(x, pads)", "", {"pads": PADS}, 18),
    ("Pad <mode = \"constant\"> (x, pads, zero)", "pads = [1, 0, 0, 1], strides = [2, 1], dilations = [1, 2]",
     {"pads": PADS, "zero": np.zeros((), np.float32)}, 18),
    ("Pad(x, pads, , axes)", "", {"pads": np.array([1, 2, 3, 0], np.int64), "axes": np.array([2, -1], np.int64)},
     18),
    ("Pad <pads = [0, 0, 2, 1, 0, 0, 0, 1]> (x)", "pads = [1, 1, 1, 1]", {}, 10),
])
def test_pad_conv_folds(pad_line, conv_attrs, weights, opset):
    proto, feeds = _pad_model(pad_line, conv_attrs, weights, opset)
    model = optimized(proto, ["fuse-pad-conv"])
    assert ops(model) == ["Conv"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("pad_line", "conv_attrs", "weights", "why"), [
    ("Pad <mode = \"reflect\"> (x, pads)", "", {"pads": PADS}, "Pad mode 'reflect'"),
    ("Pad(x, pads, one)", "", {"pads": PADS, "one": np.ones((), np.float32)}, "constant value is not zero"),
    ("Pad(x, pads)", "", {"pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64)}, "batch or channel"),
    ("Pad(x, pads)", "", {"pads": np.array([0, 0, -1, 0, 0, 0, 1, 0], np.int64)}, "negative pads"),
    ("Pad(x, pads)", "auto_pad = \"SAME_UPPER\"", {"pads": PADS}, "auto_pad='SAME_UPPER'"),
])
def test_pad_conv_refuses(pad_line, conv_attrs, weights, why):
    proto, _ = _pad_model(pad_line, conv_attrs, weights)
    assert why in not_fired(proto, FusePadConv, "pad-conv")


def test_pad_conv_refuses_computed_pads():
    text = f"""{HEADER}
    g (float[N, 3, 9, 8] x, int64[8] pads) => (float y) {{
        p = Pad(x, pads)
        y = Conv (p, w)
    }}"""
    proto = model_from(text, {"w": rand(4, 3, 3, 3)})
    assert "expected a constant, got 'pads'" in not_fired(proto, FusePadConv, "pad-conv")


# -- zoo -------------------------------------------------------------------------------------------------------------
ZOO_PASSES = ["lift-constants", "fold-conv-batchnorm", "fold-conv-scale-bias", "fuse-pad-conv",
              "eliminate-dead-nodes", "remove-unused-initializers"]


@pytest.mark.parametrize("name", ["resnet_torchscript", "mobilenet_torchscript", "digits_cnn_torchscript"])
def test_zoo_batchnorm_folded(name):
    path = build(name)
    model = graphopt.load(path)
    before = collections.Counter(n.op_type for n in model.graph)
    result = graphopt.optimize(model, ZOO_PASSES)
    after = collections.Counter(n.op_type for n in model.graph)
    assert before["BatchNormalization"] > 0 and after["BatchNormalization"] == 0
    assert after["Conv"] == before["Conv"]
    assert result.pipeline.stats["fold-conv-batchnorm"].changes == before["BatchNormalization"]
    for second in (False, True):
        assert_same_outputs(str(path), model, make_inputs(MODELS[name], second=second))


# -- random configurations -------------------------------------------------------------------------------------------
@st.composite
def _conv_configs(draw) -> dict:
    op = draw(st.sampled_from(CONV_OPS))
    group = draw(st.sampled_from([1, 2, 3]))
    spatial = draw(st.integers(1, 3))
    return {
        "op": op, "group": group, "spatial": spatial,
        "c": group * draw(st.integers(1, 3)), "m": group * draw(st.integers(1, 3)),
        "kernel": draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial)),
        "stride": draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial)),
        "dilation": draw(st.lists(st.integers(1, 2), min_size=spatial, max_size=spatial)),
        "bias": draw(st.booleans()),
        "tail": draw(st.lists(st.sampled_from(["bn", "mul", "div", "add", "sub"]), min_size=1, max_size=3)),
        "seed": draw(st.integers(0, 1000)),
    }


@settings(max_examples=40, deadline=None)
@given(_conv_configs())
def test_random_conv_chains_fold_into_one_conv(cfg):
    """Conv/ConvTranspose of random group, rank, kernel, stride and dilation, followed by BN/Mul/Div/Add/Sub."""
    seed, m, n = cfg["seed"], cfg["m"], cfg["spatial"]
    w_shape = ((m, cfg["c"] // cfg["group"]) if cfg["op"] == "Conv" else (cfg["c"], m // cfg["group"]))
    weights = {"w": rand(*w_shape, *cfg["kernel"], seed=seed), **_bn_weights(m, seed + 1)}
    lines, prev = [], "c0"
    for i, step in enumerate(cfg["tail"]):
        out = "y" if i == len(cfg["tail"]) - 1 else f"t{i}"
        if step == "bn":
            lines.append(f"{out} = BatchNormalization ({prev}, scale, bias, mean, var)")
        else:
            weights[f"k{i}"] = positive(*((m,) + (1,) * n if seed % 2 else ()), seed=seed + i)
            lines.append(f"{out} = {step.capitalize()}({prev}, k{i})")
        prev = out
    if cfg["bias"]:
        weights["b"] = rand(m, seed=seed + 9)
    attrs = (f"group = {cfg['group']}, strides = {cfg['stride']}, dilations = {cfg['dilation']}, "
             f"kernel_shape = {cfg['kernel']}")
    size = ", ".join(["6"] * n)
    text = f"""{HEADER}
    g (float[N, {cfg['c']}, {size}] x) => (float y) {{
        c0 = {cfg['op']} <{attrs}> (x, w{', b' if cfg['bias'] else ''})
        {chr(10).join(lines)}
    }}"""
    proto = model_from(text, weights)
    model = optimized(proto, ["fold-conv-batchnorm", "fold-conv-scale-bias"])
    assert ops(model) == [cfg["op"]]
    assert_same_outputs(proto, model, {"x": rand(2, cfg["c"], *[6] * n, seed=seed + 5)})
