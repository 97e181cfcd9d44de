"""GELU / SiLU fusion (passes/fusion/gelu.py): the exporters' spellings, bias folding, numerics in
onnxruntime, and the reason each rule gives when it does not fire."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.passes.fusion import gelu
from graphopt.verify import verify_models
from tests.helpers import parse

BIAS = "float[8] bias = {" + ", ".join(str(round(-0.4 + 0.1 * i, 2)) for i in range(8)) + "}"
W = "float[8, 8] w = {" + ", ".join(str(round(((i * 7) % 11 - 5) * 0.05, 2)) for i in range(64)) + "}"


def model_text(body: str, opset: int = 17) -> str:
    return f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N, S, 8] x) => (float[N, S, 8] y) <{BIAS}, {W}> {{
        m = MatMul(x, w)
        h = Add(m, bias)
        {body}
    }}
    """


def fuse(text: str, passes: list[str]):
    original = parse(text)
    model = graphopt.load(original)
    graphopt.optimize(model, ["lift-constants", *passes, "eliminate-dead-nodes", "remove-unused-initializers"])
    return original, model


def ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def check_numerics(original, model):
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3
    report = verify_models(original, graphopt.to_bytes(model), inputs={"x": x})
    assert report.ok, report.summary()


def reasons(model, rules, name: str) -> list[str]:
    return [e.reason for e in rules.explain(model, name) if e.reason]


ERF_TORCHSCRIPT = """
        s2 = Constant <value = float {1.4142135381698608}> ()
        d = Div(h, s2)
        e = Erf(d)
        one = Constant <value = float {1.0}> ()
        a = Add(e, one)
        p = Mul(h, a)
        half = Constant <value = float {0.5}> ()
        y = Mul(p, half)
"""
ERF_DYNAMO = """
        s2 = Constant <value = float {1.4142135381698608}> ()
        d = Div(h, s2)
        e = Erf(d)
        one = Constant <value = float {1.0}> ()
        a = Add(e, one)
        half = Constant <value = float {0.5}> ()
        p = Mul(half, a)
        y = Mul(h, p)
"""
ERF_HALF_X = """
        r2 = Constant <value = float {0.70710678}> ()
        d = Mul(r2, h)
        e = Erf(d)
        one = Constant <value = float {1.0}> ()
        a = Add(one, e)
        half = Constant <value = float {0.5}> ()
        p = Mul(h, half)
        y = Mul(a, p)
"""
TANH_GPT2 = """
        half = Constant <value = float {0.5}> ()
        hh = Mul(h, half)
        three = Constant <value = float {3.0}> ()
        cube = Pow(h, three)
        c = Constant <value = float {0.044714998453855515}> ()
        cc = Mul(cube, c)
        poly = Add(h, cc)
        k = Constant <value = float {0.7978845834732056}> ()
        inner = Mul(poly, k)
        t = Tanh(inner)
        one = Constant <value = float {1.0}> ()
        a = Add(t, one)
        y = Mul(hh, a)
"""
TANH_MUL_CUBE = """
        sq = Mul(h, h)
        cube = Mul(sq, h)
        c = Constant <value = float {0.044715}> ()
        cc = Mul(c, cube)
        poly = Add(cc, h)
        k = Constant <value = float {0.7978845608}> ()
        inner = Mul(k, poly)
        t = Tanh(inner)
        one = Constant <value = float {1.0}> ()
        a = Add(one, t)
        p = Mul(h, a)
        half = Constant <value = float {0.5}> ()
        y = Mul(half, p)
"""


@pytest.mark.parametrize(("body", "fused"), [
    (ERF_TORCHSCRIPT, "BiasGelu"), (ERF_DYNAMO, "BiasGelu"), (ERF_HALF_X, "BiasGelu"),
    (TANH_GPT2, "FastGelu"), (TANH_MUL_CUBE, "FastGelu"),
])
def test_gelu_forms_fuse_with_their_bias(body: str, fused: str):
    original, model = fuse(model_text(body), ["fuse-gelu"])
    assert ops(model.graph) == ["MatMul", fused]
    node = model.graph.nodes[1]
    assert node.domain == "com.microsoft" and len(node.inputs) == 2
    check_numerics(original, model)


def test_standard_gelu_after_bias_becomes_bias_gelu():
    for approximate, fused in (("none", "BiasGelu"), ("tanh", "FastGelu")):
        text = model_text(f'y = Gelu <approximate = "{approximate}"> (h)', opset=20)
        original, model = fuse(text, ["fuse-gelu"])
        assert ops(model.graph) == ["MatMul", fused]
        check_numerics(original, model)


def test_gelu_negatives_say_why():
    wrong_scale = ERF_TORCHSCRIPT.replace("1.4142135381698608", "1.5")
    _, model = fuse(model_text(wrong_scale), ["fuse-gelu"])
    assert "Gelu" not in ops(model.graph) and "BiasGelu" not in ops(model.graph)
    assert any("not by sqrt(2)" in r for r in reasons(model, gelu.GELU_RULES, "gelu-erf"))

    wrong_coefficient = TANH_GPT2.replace("0.044714998453855515", "0.05")
    _, model = fuse(model_text(wrong_coefficient), ["fuse-gelu"])
    assert "FastGelu" not in ops(model.graph)
    assert any("not 0.044715 and sqrt(2/pi)" in r for r in reasons(model, gelu.GELU_RULES, "gelu-tanh-half-x"))


def test_bias_gelu_refuses_a_bias_that_is_not_per_channel():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x) => (float[N, 8] y) <float[2, 1] col = {0.5, -0.5}> {
        h = Add(x, col)
        y = com.microsoft.Gelu(h)
    }
    """.replace("com.microsoft.Gelu(h)", "Gelu <approximate = \"none\"> (h)").replace('"" : 17', '"" : 20')
    original, model = fuse(text, ["fuse-gelu"])
    assert ops(model.graph) == ["Add", "Gelu"]
    why = reasons(model, gelu.GELU_RULES, "bias-gelu-onnx")
    assert any("is not a bias along the last axis" in r for r in why), why


def test_silu_to_quick_gelu_and_negative():
    original, model = fuse(model_text("s = Sigmoid(h)\n        y = Mul(s, h)"), ["fuse-silu"])
    assert ops(model.graph) == ["MatMul", "Add", "QuickGelu"]
    assert model.graph.nodes[2].attr("alpha") == 1.0
    check_numerics(original, model)

    _, model = fuse(model_text("s = Sigmoid(m)\n        y = Mul(s, h)"), ["fuse-silu"])
    assert "QuickGelu" not in ops(model.graph)
    why = reasons(model, gelu.SILU_RULES, "silu")
    # the nearest miss (Sigmoid matched, then x differs), not the first input order tried
    assert why == ["input 1 of <unnamed Mul -> y>: x is 'm' elsewhere in the pattern but 'h' here"], why
