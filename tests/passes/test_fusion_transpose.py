"""Transpose sinking (passes/fusion/transpose.py), alone and with ``eliminate-noops`` cancelling the pairs it
brings together; checked against onnxruntime, with the reasons for not firing."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.passes.fusion.transpose import SinkTransposes
from tests.passes.test_fusion_support import assert_same_outputs, model_from, not_fired, ops, optimized, rand

pytest.importorskip("graphopt.passes.simplify.noop")  # eliminate-noops cancels the Transpose pairs

NHWC = "perm = [0, 2, 3, 1]"
NCHW = "perm = [0, 3, 1, 2]"
SINK = ["sink-transposes", "eliminate-noops"]


def _model(body: str, weights: dict | None = None, signature: str = "float[2, 3, 5, 4] x", opset: int = 18,
           outputs: str = "float y"):
    text = f'<ir_version: 8, opset_import: ["" : {opset}]>\n g ({signature}) => ({outputs}) {{\n {body}\n }}'
    proto = model_from(text, weights)
    feeds = {}
    for decl in signature.split(", float"):
        shape, name = decl.split("[")[1].split("] ")
        feeds[name] = rand(*[int(d) for d in shape.split(",")], seed=len(feeds), low=-3, high=3)
    return proto, feeds


@pytest.mark.parametrize(("body", "expected", "outputs"), [
    (f"t = Transpose <{NHWC}> (x)\n r = Relu(t)\n y = Transpose <{NCHW}> (r)", ["Relu"], "float y"),
    (f"t = Transpose <{NHWC}> (x)\n a = LeakyRelu <alpha = 0.3> (t)\n b = Sigmoid(a)\n c = Cast <to = 11> (b)\n"
     f" y = Transpose <{NCHW}> (c)", ["LeakyRelu", "Sigmoid", "Cast"], "double y"),
    (f"t = Transpose <{NHWC}> (x)\n c = Clip(t, lo, hi)\n y = Transpose <{NCHW}> (c)", ["Clip"], "float y"),
    (f"t = Transpose <{NHWC}> (x)\n a = Neg(t)\n y = Transpose <perm = [0, 2, 1, 3]> (a)", ["Neg", "Transpose"],
     "float y"),
    ("t = Transpose (x)\n a = Abs(t)\n y = Transpose (a)", ["Abs"], "float y"),
])
def test_unary_sinking_lets_pairs_cancel(body, expected, outputs):
    proto, feeds = _model(body, {"lo": np.float32(-1), "hi": np.float32(1)}, outputs=outputs)
    model = optimized(proto, SINK)
    assert ops(model) == expected
    assert_same_outputs(proto, model, feeds)


def test_binary_with_two_transposes_keeps_one():
    proto, feeds = _model(f"a = Transpose <{NHWC}> (x)\n b = Transpose <{NHWC}> (z)\n y = Sub(a, b)",
                          signature="float[2, 3, 5, 4] x, float[1, 3, 1, 4] z")
    model = graphopt.load(proto)
    assert SinkTransposes.rules.apply(model) == {"transpose-binary": 1}
    assert ops(model) == ["Sub", "Transpose"]
    assert_same_outputs(proto, model, feeds)


def test_nhwc_island_disappears():
    """NCHW -> NHWC, bias add over channels (last axis), Relu, scale, compare, back to NCHW: no Transpose left."""
    body = (f"t = Transpose <{NHWC}> (x)\n a = Add(t, bias)\n r = Relu(a)\n s = Mul(half, r)\n"
            f" u = Transpose <{NHWC}> (z)\n m = Max(s, u)\n y = Transpose <{NCHW}> (m)")
    proto, feeds = _model(body, {"bias": rand(3, seed=4), "half": np.float32(0.5)},
                          signature="float[2, 3, 5, 4] x, float[2, 3, 5, 4] z")
    model = optimized(proto, SINK)
    assert ops(model) == ["Add", "Relu", "Mul", "Max"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("line", "const", "outputs"), [
    ("y = Mul(t, c)", rand(3, seed=1), "float y"),  # per-channel in NHWC: [1, 3, 1, 1] in NCHW
    ("y = Sub(c, t)", rand(5, 1, 3, seed=2), "float y"),
    ("y = PRelu(t, c)", rand(1, 3, seed=3), "float y"),
    ("y = Greater(t, c)", np.float32(0.5), "bool y"),
])
def test_constant_operands_are_permuted_back(line, const, outputs):
    proto, feeds = _model(f"t = Transpose <{NHWC}> (x)\n {line}", {"c": const}, outputs=outputs)
    model = graphopt.load(proto)
    counts = SinkTransposes.rules.apply(model)
    assert sum(counts.values()) == 1
    assert ops(model)[-1] == "Transpose"
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("body", "weights", "signature", "rule", "why"), [
    (f"a = Transpose <{NHWC}> (x)\n b = Transpose <perm = [0, 3, 2, 1]> (z)\n y = Add(a, b)", {},
     "float[2, 3, 4, 4] x, float[2, 3, 4, 4] z", "transpose-binary", "the perms differ: [0, 2, 3, 1] and [0, 3, 2, 1]"),
    (f"t = Transpose <{NHWC}> (x)\n y = Relu(t)\n z = Neg(t)", {}, "float[2, 3, 5, 4] x", "transpose-unary",
     "is also used by"),
    (f"t = Transpose <{NHWC}> (x)\n y = Clip(t, lo, hi)\n z = Neg(t)", {"lo": np.float32(0), "hi": np.float32(1)},
     "float[2, 3, 5, 4] x", "transpose-clip", "'t' (from <unnamed Transpose -> t>) is also used by <unnamed Neg -> z>"),
    ("r = Squeeze(x)\n t = Transpose (r)\n y = Exp(t)", {}, "float[2, 3, 5, 4] x", "transpose-unary",
     "no perm and its input rank is unknown"),
    (f"r = Relu(x)\n t = Transpose <{NHWC}> (r)\n y = Add(t, c)", {"c": rand(3)}, "float[2, 3, 5, 4] x",
     "transpose-binary-const", "not a scalar and x's shape is unknown"),
    (f"t = Transpose <{NHWC}> (x)\n y = Add(t, c)", {"c": rand(2, 5, 4, 3)}, "float[1, 3, 5, 4] x",
     "transpose-binary-const", "could broadcast the Transpose output [1, 5, 4, 3] up"),
    (f"t = Transpose <{NHWC}> (x)\n y = Add(c, t)", {"c": rand(1, 1, 1, 1, 1)}, "float[2, 3, 5, 4] x",
     "const-binary-transpose", "constant of rank 5 broadcasts the rank-4 Transpose output up"),
])
def test_sinking_refuses(body, weights, signature, rule, why):
    outputs = "float y, float z" if "z = Neg" in body else "float y"
    proto, _ = _model(body, weights, signature, outputs=outputs)
    assert why in not_fired(proto, SinkTransposes, rule)
