"""Activation fusions (passes/fusion/activation.py): HardSwish / HardSigmoid recognition and Relu + Clip,
checked against onnxruntime, with the reasons for not firing."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.fusion.activation import FuseHardActivations
from tests.passes.test_fusion_support import assert_same_outputs, model_from, not_fired, ops, optimized, rand

SIXTH = np.float32(1.0 / 6.0)
CONSTS = {"three": np.float32(3.0), "zero": np.float32(0.0), "six": np.float32(6.0), "sixth": SIXTH}
RELU6 = "s = Add(x, three)\n r = Clip(s, zero, six)"


def _model(body: str, opset: int = 18, weights: dict | None = None, signature: str = "float[2, 3, 8, 8] x"):
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\n g ({signature}) => (float y) {{\n {body}\n }}'
    proto = model_from(text, {**CONSTS, **(weights or {})})
    shape = [int(d) for d in signature.split("[")[1].split("]")[0].split(",")]
    return proto, {"x": rand(*shape, seed=1, low=-5.0, high=5.0)}


HARDSWISH_FORMS = {  # id: (body, rules expected to fire)
    "div-of-product": (f"{RELU6}\n p = Mul(x, r)\n y = Div(p, six)", {"hardswish-div": 1}),
    "product-times-sixth": (f"{RELU6}\n p = Mul(r, x)\n y = Mul(p, sixth)", {"hardswish-mul": 1}),
    "sixth-times-product": ("s = Add(three, x)\n r = Clip(s, zero, six)\n p = Mul(x, r)\n y = Mul(sixth, p)",
                            {"hardswish-mul": 1}),
    "x-times-quotient": (f"{RELU6}\n h = Div(r, six)\n y = Mul(x, h)",
                         {"hardsigmoid-div": 1, "hardswish-hardsigmoid": 1}),
    "x-times-scaled": (f"{RELU6}\n h = Mul(sixth, r)\n y = Mul(h, x)",
                       {"hardsigmoid-mul": 1, "hardswish-hardsigmoid": 1}),
    "hardsigmoid": ("h = HardSigmoid <alpha = 0.16666667, beta = 0.5> (x)\n y = Mul(x, h)",
                    {"hardswish-hardsigmoid": 1}),
}


@pytest.mark.parametrize("form", list(HARDSWISH_FORMS))
def test_hardswish_recognized(form):
    body, fired = HARDSWISH_FORMS[form]
    proto, feeds = _model(body)
    model = optimized(proto, [])
    assert FuseHardActivations.rules.apply(model) == fired
    assert ops(model) == ["HardSwish"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("body", "opset", "rule"), [
    (f"{RELU6}\n y = Div(r, six)", 18, "hardsigmoid-div"),
    (f"{RELU6}\n y = Mul(r, sixth)", 18, "hardsigmoid-mul"),
    ("s = Add(x, three)\n r = Clip <min = 0.0, max = 6.0> (s)\n y = Div(r, six)", 10, "hardsigmoid-div"),
])
def test_hardsigmoid_recognized(body, opset, rule):
    proto, feeds = _model(body, opset)
    model = optimized(proto, ["fuse-hard-activations"])
    assert ops(model) == ["HardSigmoid"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize("form", ["div-of-product", "x-times-quotient"])
def test_before_opset_14_hardswish_is_x_times_hardsigmoid(form):
    proto, feeds = _model(HARDSWISH_FORMS[form][0], opset=13)
    model = optimized(proto, ["fuse-hard-activations"])
    assert ops(model) == ["HardSigmoid", "Mul"]
    assert_same_outputs(proto, model, feeds)
    explained = FuseHardActivations.rules.explain(model, "hardswish-hardsigmoid")
    assert [e.reason for e in explained] == ["condition: HardSwish needs opset 14, the model has 13"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter is deprecated, on purpose
def test_torch_export():
    """What torch.onnx.export (TorchScript) writes for relu6 arithmetic, hardswish, hardsigmoid and relu+clamp."""
    torch = pytest.importorskip("torch")
    import io

    class Block(torch.nn.Module):
        def forward(self, x):
            a = x * torch.nn.functional.relu6(x + 3) / 6
            b = torch.nn.functional.hardswish(a) + torch.nn.functional.relu6(a + 3) / 6
            return torch.relu(b).clamp(0, 6)

    for opset, expected in ((18, ["HardSwish", "HardSwish", "HardSigmoid", "Add", "Clip"]),
                            (13, ["HardSigmoid", "Mul", "HardSigmoid", "Mul", "HardSigmoid", "Add", "Clip"])):
        buffer = io.BytesIO()
        torch.onnx.export(Block().eval(), (torch.randn(2, 3, 4, 4),), buffer, opset_version=opset, dynamo=False,
                          input_names=["x"], output_names=["y"])
        model = optimized(buffer.getvalue(), ["fuse-hard-activations"])
        assert ops(model) == expected
        assert_same_outputs(buffer.getvalue(), model, {"x": rand(2, 3, 4, 4, low=-5, high=5)})


@pytest.mark.parametrize(("body", "weights", "rule", "why"), [
    ("s = Add(x, three)\n r = Clip(s, zero, five)\n p = Mul(x, r)\n y = Div(p, six)", {"five": np.float32(5.0)},
     "hardswish-div",
     "Clip bounds (0.0, 5.0), expected (0, 6)"),
    ("s = Add(x, two)\n r = Clip(s, zero, six)\n y = Div(r, six)", {"two": np.float32(2.0)}, "hardsigmoid-div",
     "constant 'two' fails the pattern's predicate"),
    (f"{RELU6}\n y = Div(r, seven)", {"seven": np.float32(7.0)}, "hardsigmoid-div",
     "constant 'seven' fails the pattern's predicate"),
    ("s = Add(x, three3)\n r = Clip(s, zero, six)\n y = Div(r, six)", {"three3": np.full((1, 1, 1, 1, 1), 3.0,
                                                                                         np.float32)},
     "hardsigmoid-div", "constant 'three3' of rank 5 could broadcast x (rank 4)"),
    (f"{RELU6}\n y = Mul(r, fifth)", {"fifth": np.float32(0.2)}, "hardsigmoid-mul",
     "constant 'fifth' fails the pattern's predicate"),
    ("s = Add(z, three)\n r = Clip(s, zero, six)\n p = Mul(x, r)\n y = Mul(p, sixth)", {}, "hardswish-mul",
     "x is 'x' elsewhere in the pattern but 'z' here"),
    ("h = HardSigmoid(x)\n y = Mul(x, h)", {}, "hardswish-hardsigmoid",
     "HardSigmoid alpha=0.2"),
    (f"{RELU6}\n p = Mul(x, r)\n q = Div(p, six)\n y = Add(q, s)", {}, "hardswish-div",
     "is also used by <unnamed Add -> y>"),
])
def test_hard_activations_refuse(body, weights, rule, why):
    signature = "float[2, 3, 8, 8] x, float[2, 3, 8, 8] z" if "Add(z," in body else "float[2, 3, 8, 8] x"
    proto, _ = _model(body, weights=weights, signature=signature)
    assert why in not_fired(proto, FuseHardActivations, rule)


# -- relu-clip / clip-relu -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "opset", "weights", "expected"), [
    ("r = Relu(x)\n y = Clip(r, lo, hi)", 18, {"lo": np.float32(-1.0), "hi": np.float32(6.0)}, ["Clip"]),
    ("r = Relu(x)\n y = Clip(r, , hi)", 18, {"hi": np.float32(6.0)}, ["Clip"]),
    ("r = Relu(x)\n y = Clip(r, lo)", 18, {"lo": np.float32(2.0)}, ["Clip"]),
    ("c = Clip(x, lo, hi)\n y = Relu(c)", 18, {"lo": np.float32(-3.0), "hi": np.float32(1.5)}, ["Clip"]),
    ("c = Clip <min = -1.0, max = 6.0> (x)\n y = Relu(c)", 10, {}, ["Clip"]),
    ("r = Relu(x)\n y = Clip <min = -1.0> (r)", 10, {}, ["Clip"]),
])
def test_relu_and_clip_merge(body, opset, weights, expected):
    proto, feeds = _model(body, opset, weights)
    model = optimized(proto, ["fuse-hard-activations"])
    assert ops(model) == expected
    assert_same_outputs(proto, model, feeds)


def test_clip_relu_refuses_a_negative_max():
    proto, _ = _model("c = Clip(x, lo, hi)\n y = Relu(c)", weights={"lo": np.float32(-3.0), "hi": np.float32(-1.0)})
    assert "Clip max -1.0 < 0" in not_fired(proto, FuseHardActivations, "clip-relu")


def test_relu_clip_refuses_computed_bounds():
    proto, _ = _model("r = Relu(x)\n hi = Abs(x)\n y = Clip(r, , hi)", signature="float[4] x")
    assert "expected a constant, got 'hi'" in not_fired(proto, FuseHardActivations, "relu-clip")
