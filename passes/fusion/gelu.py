"""GELU and SiLU fusion: the exporters' elementwise spellings -> one onnxruntime activation op.

Erf GELU ``x * 0.5 * (1 + Erf(x / sqrt 2))`` (any association of the three factors, ``/ sqrt 2`` or
``* 1/sqrt 2``) -> ``com.microsoft`` ``Gelu``; tanh GELU ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x +
0.044715 x^3)))`` -> ``com.microsoft`` ``FastGelu``; ``x * Sigmoid(x)`` -> ``com.microsoft``
``QuickGelu(alpha=1)``. A bias Add in front of the activation (the Linear layer's bias) is then folded
in: ``BiasGelu(x, b)`` / ``FastGelu(x, b)``. A standard ``Gelu`` (opset 20) after a bias Add gets the
same treatment.

Measured with ``python tools/measure_attention_ops.py ops --family gelu --batch 1 8 --runs 40 --levels
basic all`` (onnxruntime 1.32 CPU, 2 threads, spinning off; [8, 128, 3072] after a bias Add, median CPU
ms of interleaved runs; batch 1 showed the same order)::

                                                ORT_ENABLE_BASIC  ORT_ENABLE_ALL
    erf GELU, decomposed                              10.05           5.68  (ALL fuses it to BiasGelu)
    Gelu (opset 20) / com.microsoft Gelu           6.45 / 6.17     5.32 / 6.17
    com.microsoft BiasGelu (bias Add folded in)        5.42           5.43
    tanh GELU, decomposed                             12.46          12.28  (ALL leaves it)
    Gelu(approximate="tanh") (opset 20)                4.37           3.90
    com.microsoft FastGelu / with the bias folded  4.33 / 3.61     4.08 / 3.74
    x * Sigmoid(x)                                     4.52           4.13
    com.microsoft QuickGelu(alpha=1)                   3.96           3.79
    Swish (opset 24)                                   5.86           5.81

So: com.microsoft Gelu, then BiasGelu with the bias folded in (what ORT_ENABLE_ALL makes of the
decomposed form, now also under ORT_ENABLE_BASIC); FastGelu with the bias folded in (fastest, and
needs no opset change, unlike Gelu-20); QuickGelu for SiLU. The fused ops are float32-only in
onnxruntime's CPU provider, hence the float32 conditions.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.ir import Node, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, Rule, RuleSet

from .norm import ShapeAwareRewritePass, last_dim, scalar

MS = "com.microsoft"
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def close(value: float | None, expected: float, rtol: float = 1e-4) -> bool:
    return value is not None and abs(value - expected) <= rtol * abs(expected)


def float32(constant: Value) -> str | None:
    """The onnxruntime CPU kernels of these contrib ops are float32 only; the pattern's constants have the
    input's type (the ops require it), so their type tells without shape inference."""
    if constant.elem_type != 1:
        return f"{constant.name!r} is not float32 (elem_type {constant.elem_type}): the fused op is float32 only"
    return None


def _three_factor_products(op, x, inner, half):
    """x * inner * 0.5 in its three associations (each product commutative)."""
    return {
        "": op.Mul(op.Mul(x, inner, _commute=True), half, _commute=True),
        "-half-inner": op.Mul(x, op.Mul(inner, half, _commute=True), _commute=True),
        "-half-x": op.Mul(op.Mul(x, half, _commute=True), inner, _commute=True),
    }


# ------------------------------------------------------------------------------------------ erf GELU


def _erf_gelu_target(association: str):
    def target(op, x):
        scaled = op.Any(x, op.const("s"), _ops={"Div", "Mul"}, _commute=True, _name="scale")
        inner = op.Add(op.Erf(scaled), op.const("one"), _commute=True)
        return _three_factor_products(op, x, inner, op.const("half"))[association]

    return target


def _erf_gelu_condition(ctx: MatchContext, x: Value, s: Value, one: Value, half: Value, scale: Node):
    if scale.op_type == "Div" and scale.inputs[0] is not x:
        return f"{scale.label()} divides a constant by x"
    expected = SQRT2 if scale.op_type == "Div" else 1 / SQRT2
    if not close(scalar(s), expected):
        return f"{scale.label()} scales by {scalar(s)}, not by {'sqrt(2)' if scale.op_type == 'Div' else '1/sqrt(2)'}"
    return _one_and_half(one, half)


def _one_and_half(one: Value, half: Value) -> str | bool:
    """The shared tail of both GELU conditions: x * 0.5 * (1 + f(x))."""
    if scalar(one) != 1.0 or scalar(half) != 0.5:
        return f"the constants are {scalar(one)} and {scalar(half)}, not 1 and 0.5"
    return float32(half) or True


def _erf_gelu(op, x: Value, ctx: MatchContext) -> Value:
    return op.Gelu(x, _domain=MS, _type=ctx.root.outputs[0])


# ------------------------------------------------------------------------------------------ tanh GELU


def _tanh_gelu_target(association: str, cube: str):
    def target(op, x):
        if cube == "pow":
            x3 = op.Pow(x, op.const("three"))
        else:
            x3 = op.Mul(op.Mul(x, x), x, _commute=True)
        poly = op.Add(x, op.Mul(x3, op.const("c"), _commute=True), _commute=True)
        inner = op.Add(op.Tanh(op.Mul(poly, op.const("k"), _commute=True)), op.const("one"), _commute=True)
        return _three_factor_products(op, x, inner, op.const("half"))[association]

    return target


def _tanh_gelu_condition(ctx: MatchContext, x: Value, c: Value, k: Value, one: Value, half: Value,
                         three: Value | None = None):
    if three is not None and scalar(three) != 3.0:
        return f"the exponent is {scalar(three)}, not 3"
    if not close(scalar(c), 0.044715) or not close(scalar(k), SQRT_2_OVER_PI):
        return f"the constants are {scalar(c)} and {scalar(k)}, not 0.044715 and sqrt(2/pi)"
    return _one_and_half(one, half)


def _tanh_gelu(op, x: Value, ctx: MatchContext) -> Value:
    return op.FastGelu(x, _domain=MS, _type=ctx.root.outputs[0])


# ------------------------------------------------------------------------------------------ bias


def bias_vector(x: Value, b: Value) -> str | None:
    """Why constant ``b`` (added to ``x``) is not a per-channel bias of x's last axis, or None."""
    d = last_dim(x)
    if d is None:
        return f"the last dim of {x.name!r} is unknown; run infer-shapes first"
    shape = b.const.shape
    if b.const.size != d or (shape and shape[-1] != d) or (x.shape is not None and len(shape) > len(x.shape)):
        return f"{b.name!r} of shape {list(shape)} is not a bias along the last axis (size {d})"
    if b.elem_type != x.elem_type:
        return f"{b.name!r} and {x.name!r} have different element types"
    return None


def _bias_target(op_type: str, domain: str):
    def target(op, x):
        return getattr(op, op_type)(op.Add(x, op.const("b"), _commute=True), _domain=domain, _name="act")

    return target


def _bias_condition(ctx: MatchContext, x: Value, b: Value, act: Node):
    if act.op_type == "Gelu" and act.domain in ("", "ai.onnx") and act.attr("approximate", "none") not in ("none",
                                                                                                        "tanh"):
        return f"{act.label()} has approximate={act.attr('approximate')!r}"
    return float32(b) or bias_vector(x, b) or True


def _bias_replacement(op, x: Value, b: Value, act: Node, ctx: MatchContext) -> Value:
    bias = op.const(np.ascontiguousarray(b.const.numpy().reshape(-1)))
    tanh = act.op_type == "FastGelu" or act.attr("approximate", "none") == "tanh"
    return (op.FastGelu if tanh else op.BiasGelu)(x, bias, _domain=MS, _type=ctx.root.outputs[0])


GELU_RULES = RuleSet(
    [Rule(f"gelu-erf{a}", _erf_gelu_target(a), _erf_gelu, _erf_gelu_condition)
     for a in ("", "-half-inner", "-half-x")]
    + [Rule(f"gelu-tanh{a}{'' if cube == 'pow' else '-mul-cube'}", _tanh_gelu_target(a, cube), _tanh_gelu,
            _tanh_gelu_condition) for a in ("", "-half-inner", "-half-x") for cube in ("pow", "mul")]
    + [Rule("bias-gelu", _bias_target("Gelu", MS), _bias_replacement, _bias_condition),
       Rule("bias-gelu-onnx", _bias_target("Gelu", ""), _bias_replacement, _bias_condition),
       Rule("bias-fast-gelu", _bias_target("FastGelu", MS), _bias_replacement, _bias_condition)]
)


@register_pass
class FuseGelu(ShapeAwareRewritePass):
    name = "fuse-gelu"
    description = ("Erf GELU -> com.microsoft Gelu/BiasGelu, tanh GELU -> com.microsoft FastGelu (bias folded "
                   "in), for onnxruntime")
    level = "fuse"
    rules = GELU_RULES


# ------------------------------------------------------------------------------------------ SiLU


def _silu_condition(ctx: MatchContext, x: Value):
    if x.elem_type != 1:
        return f"{x.name!r} is not float32 (elem_type {x.elem_type}): QuickGelu is float32 only"
    return True


SILU_RULES = RuleSet([
    Rule("silu", lambda op, x: op.Mul(x, op.Sigmoid(x), _commute=True),
         lambda op, x, ctx: op.QuickGelu(x, _domain=MS, alpha=1.0, _type=ctx.root.outputs[0]), _silu_condition),
])


@register_pass
class FuseSilu(ShapeAwareRewritePass):
    name = "fuse-silu"
    description = "x * Sigmoid(x) -> com.microsoft QuickGelu(alpha=1) for onnxruntime"
    level = "fuse"
    rules = SILU_RULES
