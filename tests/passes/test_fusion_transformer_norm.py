"""LayerNorm / RMSNorm fusion (passes/fusion/norm.py): every exporter spelling, numerics in onnxruntime,
and the reason each rule gives when it does not fire."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.passes.fusion import norm
from graphopt.verify import verify_models
from tests.helpers import parse


def fuse(text: str, passes: list[str]):
    original = parse(text)
    model = graphopt.load(original)
    result = graphopt.optimize(model, ["lift-constants", *passes, "eliminate-dead-nodes", "remove-unused-initializers"])
    return original, model, result


def ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def check_numerics(original, model, shape=(2, 5, 16), seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1
    report = verify_models(original, graphopt.to_bytes(model), inputs={"x": x})
    assert report.ok, report.summary()


def reasons(model, rules, name: str) -> list[str]:
    return [e.reason for e in rules.explain(model, name) if e.reason]


GAMMA = "float[16] gamma = {" + ", ".join(str(round(0.5 + 0.1 * i, 2)) for i in range(16)) + "}"
BETA = "float[16] beta = {" + ", ".join(str(round(-0.3 + 0.05 * i, 2)) for i in range(16)) + "}"

# torch.onnx at opset 17 (axes attribute): d*d, Div, gamma*n, n*gamma + beta orders vary below
LN_ATTR = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S, 16] x) => (float[N, S, 16] y) <{GAMMA}, {BETA}> {{
    mean = ReduceMean <axes = [-1]> (x)
    d = Sub(x, mean)
    two = Constant <value = float {{2.0}}> ()
    sq = Pow(d, two)
    var = ReduceMean <axes = [-1]> (sq)
    eps = Constant <value = float {{1e-5}}> ()
    ve = Add(var, eps)
    std = Sqrt(ve)
    n = Div(d, std)
    scaled = Mul(n, gamma)
    y = Add(scaled, beta)
}}
"""

# opset 18 (axes input), Mul(d, d), Reciprocal, operands swapped, no beta
LN_INPUT = f"""
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, S, 16] x) => (float[N, S, 16] y) <{GAMMA}, int64[1] axes = {{2}}> {{
    mean = ReduceMean(x, axes)
    d = Sub(x, mean)
    sq = Mul(d, d)
    var = ReduceMean(sq, axes)
    eps = Constant <value = float {{1e-6}}> ()
    ve = Add(eps, var)
    std = Sqrt(ve)
    r = Reciprocal(std)
    n = Mul(r, d)
    y = Mul(gamma, n)
}}
"""


def test_layer_norm_attr_axes_gamma_beta():
    original, model, result = fuse(LN_ATTR, ["fuse-layer-norm"])
    assert ops(model.graph) == ["LayerNormalization"]
    node = model.graph.nodes[0]
    assert node.attr("axis") == -1 and node.attr("epsilon") == pytest.approx(1e-5)
    assert node.inputs[0].name == "x" and len(node.inputs) == 3
    check_numerics(original, model)


def test_layer_norm_input_axes_reciprocal_mul_no_beta():
    original, model, _ = fuse(LN_INPUT, ["fuse-layer-norm"])
    assert ops(model.graph) == ["LayerNormalization"]
    assert len(model.graph.nodes[0].inputs) == 2  # no bias input when there is no beta
    check_numerics(original, model, shape=(1, 7, 16))


def test_layer_norm_without_affine():
    text = LN_ATTR.replace("scaled = Mul(n, gamma)\n    y = Add(scaled, beta)", "y = Identity(n)")
    original, model, _ = fuse(text, ["remove-identity", "fuse-layer-norm"])
    assert ops(model.graph) == ["LayerNormalization"]
    np.testing.assert_array_equal(model.graph.nodes[0].inputs[1].const.numpy(), np.ones(16, np.float32))
    check_numerics(original, model)


def test_layer_norm_refuses_old_opset_and_says_why():
    text = LN_ATTR.replace('"" : 17', '"" : 13')
    original, model, _ = fuse(text, ["fuse-layer-norm"])
    assert "LayerNormalization" not in ops(model.graph)
    why = reasons(model, norm.LAYER_NORM_RULES, "layer-norm")
    assert any("opset 13" in r and "needs 17" in r for r in why), why


def test_layer_norm_refuses_other_axes_and_shared_intermediates():
    other_axis = LN_ATTR.replace("<axes = [-1]>", "<axes = [1]>")
    _, model, _ = fuse(other_axis, ["fuse-layer-norm"])
    assert "LayerNormalization" not in ops(model.graph)
    assert any("only the last axis" in r for r in reasons(model, norm.LAYER_NORM_RULES, "layer-norm"))

    shared = LN_ATTR.replace("=> (float[N, S, 16] y)", "=> (float[N, S, 16] y, float[N, S, 1] var)")
    _, model, _ = fuse(shared, ["fuse-layer-norm"])
    assert "LayerNormalization" not in ops(model.graph)
    assert any("graph output" in r for r in reasons(model, norm.LAYER_NORM_RULES, "layer-norm"))


def test_layer_norm_scale_fold_refuses_broadcast_that_adds_dims():
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 16] x) => (float[1, N, 16] y) <{GAMMA}, {BETA}, float[1, 1, 16] big = {{{", ".join(["1.5"] * 16)}}}> {{
        n = LayerNormalization <axis = -1> (x, gamma, beta)
        y = Mul(n, big)
    }}
    """
    _, model, _ = fuse(text, ["fuse-layer-norm"])
    assert ops(model.graph) == ["LayerNormalization", "Mul"]
    assert any("could add dims" in r for r in reasons(model, norm.LAYER_NORM_RULES, "layer-norm-scale"))


RMS = f"""
<ir_version: 8, opset_import: ["" : OPSET]>
g (float[N, S, 16] x) => (float[N, S, 16] y) <{GAMMA}, int64[1] axes = {{-1}}> {{
    two = Constant <value = float {{2.0}}> ()
    sq = Pow(x, two)
    ms = ReduceMean(sq, axes)
    eps = Constant <value = float {{1e-6}}> ()
    ve = Add(ms, eps)
    std = Sqrt(ve)
    r = Reciprocal(std)
    n = Mul(x, r)
    y = Mul(gamma, n)
}}
"""


@pytest.mark.parametrize(("opset", "fused_op"), [(18, "SimplifiedLayerNormalization"), (23, "RMSNormalization")])
def test_rms_norm_by_opset(opset: int, fused_op: str):
    original, model, _ = fuse(RMS.replace("OPSET", str(opset)), ["fuse-rms-norm"])
    assert ops(model.graph) == [fused_op]
    assert model.graph.nodes[0].attr("epsilon") == pytest.approx(1e-6)
    check_numerics(original, model)


def test_rms_norm_div_form_and_negative():
    text = RMS.replace("OPSET", "18").replace("r = Reciprocal(std)\n    n = Mul(x, r)", "n = Div(x, std)")
    original, model, _ = fuse(text, ["fuse-rms-norm"])
    assert ops(model.graph) == ["SimplifiedLayerNormalization"]
    check_numerics(original, model)

    cube = RMS.replace("OPSET", "18").replace("float {2.0}", "float {3.0}")
    _, model, _ = fuse(cube, ["fuse-rms-norm"])
    assert "SimplifiedLayerNormalization" not in ops(model.graph)
    why = reasons(model, norm.RMS_NORM_RULES, "rms-norm")
    assert any("is not a square (exponent 3.0)" in r for r in why), why


RESIDUAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, S, 16] x, float[N, S, 16] r) => (float[N, S, 16] y, float[N, S, 16] z) <{GAMMA}, {BETA}> {{
    s = Add(x, r)
    y = LayerNormalization <axis = -1, epsilon = 1e-5> (s, gamma, beta)
    b = Add(x, beta)
    z = LayerNormalization <axis = -1, epsilon = 1e-5> (b, gamma, beta)
}}
"""


def test_residual_add_before_layer_norm_becomes_sum():
    original, model, _ = fuse(RESIDUAL, ["fuse-layer-norm"])
    assert ops(model.graph) == ["Sum", "LayerNormalization", "Add", "LayerNormalization"]
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    report = verify_models(original, graphopt.to_bytes(model), inputs={"x": x, "r": x[::-1].copy()})
    assert report.ok, report.summary()
    why = reasons(model, norm.LAYER_NORM_RULES, "layer-norm-residual-sum")
    assert why == ["condition: one operand is a constant (a bias, not a residual)"], why
