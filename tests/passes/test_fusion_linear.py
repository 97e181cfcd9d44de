"""Gemm/MatMul fusions (passes/fusion/linear.py): BatchNormalization and per-column Mul/Add folded into
constant weights, and MatMul + Add -> Gemm; checked against onnxruntime, with the reasons for not firing."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.passes.fusion.linear import FoldLinearBatchNorm, FoldLinearScaleBias, MatMulAddToGemm
from tests.passes.test_fusion_support import (
    assert_same_outputs,
    model_from,
    not_fired,
    ops,
    optimized,
    positive,
    rand,
)

HEADER = '<ir_version: 8, opset_import: ["" : 18]>'
M, K, N = 5, 7, 6


def _bn_weights(n: int = N) -> dict[str, np.ndarray]:
    return {"scale": rand(n, seed=1), "bias": rand(n, seed=2), "mean": rand(n, seed=3), "var": positive(n, seed=4)}


def _model(signature: str, body: str, weights: dict, feeds: dict, output: str = "float y"):
    return model_from(f"{HEADER}\n g ({signature}) => ({output}) {{\n {body}\n }}", weights), feeds


# -- gemm-batchnorm / matmul-batchnorm -------------------------------------------------------------------------------
GEMM_CASES = {  # id: (Gemm attributes, with C, C shape)
    "plain": ("", False, None),
    "bias": ("", True, (N,)),
    "transB-alpha-beta": ("<transB = 1, alpha = 0.5, beta = 2.0>", True, (1, N)),
    "bias-per-row": ("<beta = 0.5>", True, (M, 1)),
    "transA": ("<transA = 1>", True, ()),
}


def _gemm_model(case: str, tail: str, extra: dict | None = None):
    attrs, with_c, c_shape = GEMM_CASES[case]
    trans_a, trans_b = "transA" in attrs, "transB" in attrs
    a_shape = (K, M) if trans_a else (M, K)
    weights = {"w": rand(*((N, K) if trans_b else (K, N)), seed=5), **_bn_weights(), **(extra or {})}
    if with_c:
        weights["c"] = rand(*c_shape, seed=6)
    body = f"g1 = Gemm {attrs} (a, w{', c' if with_c else ''})\n {tail}"
    return _model(f"float[{a_shape[0]}, {a_shape[1]}] a", body, weights, {"a": rand(*a_shape, seed=7)})


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_batchnorm_folds(case):
    proto, feeds = _gemm_model(case, "y = BatchNormalization <epsilon = 0.01> (g1, scale, bias, mean, var)")
    model = optimized(proto, ["fold-linear-batchnorm"])
    assert ops(model) == ["Gemm"]
    assert_same_outputs(proto, model, feeds)


def test_matmul_batchnorm_folds_then_becomes_a_gemm():
    body = "m = MatMul(a, w)\n y = BatchNormalization (m, scale, bias, mean, var)"
    proto, feeds = _model(f"float[B, {K}] a", body, {"w": rand(K, N), **_bn_weights()}, {"a": rand(M, K, seed=1)})
    model = optimized(proto, ["fold-linear-batchnorm"])
    assert ops(model) == ["MatMul", "Add"]
    assert_same_outputs(proto, model, feeds)
    model = optimized(proto, ["fold-linear-batchnorm", "matmul-add-to-gemm"])
    assert ops(model) == ["Gemm"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("signature", "first", "output", "why"), [
    (f"float[2, {N}, {K}] a", "m = MatMul(a, w)", f"float[2, {N}, {N}] y",
     "rank 3: BatchNormalization's axis 1 is not the column axis"),
    (f"float[{M}, {K}] x", "a = Squeeze(x)\n m = MatMul(a, w)", "float y", "the MatMul input's rank is unknown"),
])
def test_matmul_batchnorm_refuses(signature, first, output, why):
    proto, _ = _model(signature, f"{first}\n y = BatchNormalization (m, scale, bias, mean, var)",
                      {"w": rand(K, N), **_bn_weights()}, {}, output=output)
    assert why in not_fired(proto, FoldLinearBatchNorm, "matmul-batchnorm")


def test_gemm_batchnorm_refuses_a_weight_that_is_an_input():
    proto, _ = _model(f"float[{M}, {K}] a, float[{K}, {N}] w",
                      "g1 = Gemm(a, w)\n y = BatchNormalization (g1, scale, bias, mean, var)", _bn_weights(), {})
    assert "input 1 of <unnamed Gemm -> g1>: expected a constant, got 'w'" in not_fired(
        proto, FoldLinearBatchNorm, "gemm-batchnorm")


# -- gemm-* / matmul-* scale and bias --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(GEMM_CASES))
@pytest.mark.parametrize(("line", "shape", "rule"), [
    ("y = Mul(g1, k)", (N,), "gemm-mul"),
    ("y = Mul(k, g1)", (), "gemm-mul"),
    ("y = Div(g1, k)", (1, N), "gemm-div"),
    ("y = Add(k, g1)", (N,), "gemm-add"),
    ("y = Sub(g1, k)", (1, 1), "gemm-sub"),
])
def test_gemm_scale_bias_folds(case, line, shape, rule):
    proto, feeds = _gemm_model(case, line, {"k": positive(*shape, seed=9)})
    model = graphopt.load(proto)
    assert FoldLinearScaleBias.rules.apply(model) == {rule: 1}
    assert ops(model) == ["Gemm"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("signature", "a_shape", "line", "shape", "rule"), [
    (f"float[B, {K}] a", (M, K), "y = Mul(m, k)", (N,), "matmul-mul"),
    (f"float[2, T, {K}] a", (2, 3, K), "y = Mul(k, m)", (1, 1, N), "matmul-mul"),
    (f"float[{K}] a", (K,), "y = Div(m, k)", (N,), "matmul-div"),
    (f"float[B, {K}] a", (M, K), "y = Div(m, k)", (), "matmul-div"),
])
def test_matmul_scale_folds(signature, a_shape, line, shape, rule):
    proto, feeds = _model(signature, f"m = MatMul(a, w)\n {line}", {"w": rand(K, N), "k": positive(*shape)},
                          {"a": rand(*a_shape, seed=3)})
    model = graphopt.load(proto)
    assert FoldLinearScaleBias.rules.apply(model) == {rule: 1}
    assert ops(model) == ["MatMul"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("signature", "body", "k", "rule", "why"), [
    (f"float[{M}, {K}] a", "m = Gemm(a, w)\n y = Mul(m, k)", rand(M, 1), "gemm-mul", "varies along axis 0"),
    (f"float[{M}, {K}] a", "m = Gemm(a, w)\n y = Add(m, k)", rand(1, 1, N), "gemm-add", "more dimensions"),
    (f"float[{M}, {K}] a", "m = Gemm(a, w)\n y = Div(m, k)", np.zeros(N, np.float32), "gemm-div", "zeros"),
    (f"float[T, {K}] a", "m = MatMul(a, w)\n y = Mul(m, k)", rand(4, 1), "matmul-mul", "varies along axis 0"),
    (f"float[{M}, {K}] x", "a = Squeeze(x)\n m = MatMul(a, w)\n y = Mul(m, k)", rand(1, N), "matmul-mul",
     "the output rank is unknown"),
    (f"float[{M}, {K}] a", "m = Gemm(a, w)\n y = Sub(k, m)", rand(N), "gemm-sub",
     "input 0 of <unnamed Sub -> y>: expected the output of Gemm, got a constant 'k'"),
    (f"float[{M}, {K}] a", "m = MatMul(a, w)\n y = Div(m, k)", np.zeros((), np.float32), "matmul-div", "zeros"),
    (f"float[{M}, {K}] a", "m = MatMul(a, w)\n y = Mul(m, k)", rand(1, N).astype(np.float64), "matmul-mul",
     "expected a constant, got 'kf'"),
])
def test_linear_scale_bias_refuses(signature, body, k, rule, why):
    if k.dtype == np.float64:  # a computed constant (Cast) is not an initializer until folded
        body = body.replace("Mul(m, k)", "Mul(m, kf)").replace("m = MatMul", "kf = Cast <to = 1> (k)\n m = MatMul")
    proto, _ = _model(signature, body, {"w": rand(K, N), "k": k}, {})
    assert why in not_fired(proto, FoldLinearScaleBias, rule)


# -- matmul-add-gemm -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "shape"), [
    ("y = Add(m, c)", (N,)),
    ("y = Add(c, m)", (1, N)),
    ("y = Add(m, c)", ()),
])
def test_matmul_add_becomes_gemm(line, shape):
    proto, feeds = _model(f"float[B, {K}] a", f"m = MatMul(a, w)\n {line}", {"w": rand(K, N), "c": rand(*shape)},
                          {"a": rand(M, K, seed=2)})
    model = optimized(proto, ["matmul-add-to-gemm"])
    assert ops(model) == ["Gemm"]
    assert_same_outputs(proto, model, feeds)
    assert_same_outputs(proto, model, {"a": rand(1, K, seed=3)})


def test_mlp_layers_all_become_gemms():
    """Only the first MatMul's input is typed; the rank of the others is followed back through Relu and Gemm."""
    body = ("m1 = MatMul(a, w1)\n a1 = Add(m1, b1)\n r1 = Relu(a1)\n m2 = MatMul(r1, w2)\n a2 = Add(b2, m2)\n"
            " r2 = Sigmoid(a2)\n m3 = MatMul(r2, w3)\n y = Add(m3, b3)")
    weights = {"w1": rand(K, N, seed=1), "b1": rand(N, seed=2), "w2": rand(N, K, seed=3), "b2": rand(1, K, seed=4),
               "w3": rand(K, 3, seed=5), "b3": rand(3, seed=6)}
    proto, feeds = _model(f"float[B, {K}] a", body, weights, {"a": rand(M, K, seed=7)})
    model = optimized(proto, ["matmul-add-to-gemm"])
    assert ops(model) == ["Gemm", "Relu", "Gemm", "Sigmoid", "Gemm"]
    assert_same_outputs(proto, model, feeds)


@pytest.mark.parametrize(("signature", "body", "c", "why"), [
    (f"float[B, T, {K}] a", "m = MatMul(a, w)\n y = Add(m, c)", rand(N), "rank 3; Gemm takes 2-D inputs only"),
    (f"float[{M}, {K}] x", "a = Squeeze(x)\n m = MatMul(a, w)\n y = Add(m, c)", rand(N), "rank is unknown"),
    (f"float[{M}, {K}] a", "m = MatMul(a, w)\n y = Add(m, c)", rand(M, N), "varies along axis 0"),
    (f"float[{M}, {K}] a, float[{K}, {N}] w", "m = MatMul(a, w)\n y = Add(m, c)", rand(N), "expected a constant"),
])
def test_matmul_add_gemm_refuses(signature, body, c, why):
    weights = {"c": c} if ", float" in signature else {"w": rand(K, N), "c": c}
    proto, _ = _model(signature, body, weights, {})
    assert why in not_fired(proto, MatMulAddToGemm, "matmul-add-gemm")
