"""Activation fusions: HardSigmoid / HardSwish written out as Clip arithmetic, and Relu next to a Clip.

MobileNetV3-style models spell ``hardswish(x) = x * relu6(x + 3) / 6`` in
whichever association the author (or an exporter before opset 14) chose:
five elementwise kernels and four intermediate tensors for what onnxruntime
runs as one ``HardSwish`` (opset 14+) or ``HardSigmoid``. ``Relu`` in front of
or after ``Clip(lo >= 0, hi)`` is redundant: the Clip already clamps at 0.

Passes (level "fuse", lossless: HardSigmoid computes ``x/6 + 0.5`` where the
original computes ``(x + 3) / 6``, a difference in rounding only):

- ``fuse-hard-activations``: ``hardsigmoid-div``, ``hardsigmoid-mul`` (``Clip(x + 3, 0, 6) / 6``),
  ``hardswish-div``, ``hardswish-mul`` (``x * Clip(x + 3, 0, 6) / 6`` with the product first; before
  opset 14, which has no HardSwish, they produce ``x * HardSigmoid(x)``),
  ``hardswish-hardsigmoid`` (``x * HardSigmoid(x)`` with alpha 1/6, beta 0.5, which also covers
  ``x * (Clip(x + 3, 0, 6) / 6)`` after ``hardsigmoid-*`` fired), ``relu-clip`` and ``clip-relu``.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.ir import Node, Value
from graphopt.ir.tensor import numpy_dtype
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet

from .channels import const_array, known_rank

SIXTH = 1.0 / 6.0
HARDSWISH_OPSET = 14


def _scalar(expected: float, rel: float = 1e-6):
    """Pattern predicate: a one-element constant equal to ``expected`` (to float32 rounding)."""
    return lambda a: a.size == 1 and a.dtype.kind == "f" and math.isclose(float(a.reshape(-1)[0]), expected,
                                                                           rel_tol=rel)


def _relu6_of_x_plus_3(op, x):
    """``Clip(x + 3, lo, hi)``; the bounds are checked by :func:`_clip_bounds` (inputs or attributes)."""
    shifted = op.Add(x, op.const("three", where=_scalar(3.0)), _commute=True)
    return op.Clip(shifted, op.opt(op.const("lo")), op.opt(op.const("hi")), _name="clip")


def _clip_bounds(clip: Node, lo: Value | None, hi: Value | None) -> tuple[float, float]:
    """(min, max) of a Clip: inputs since opset 11, attributes before; absent bounds are infinite."""
    if lo is None and hi is None and ("min" in clip.attrs or "max" in clip.attrs):
        return float(clip.attr("min", -math.inf)), float(clip.attr("max", math.inf))
    low = -math.inf if lo is None else float(const_array(lo).reshape(-1)[0])
    high = math.inf if hi is None else float(const_array(hi).reshape(-1)[0])
    return low, high


def _scalar_shapes_ok(x: Value, *constants: Value | None) -> str | None:
    """The fused op keeps x's shape; a constant with more dimensions than x would have broadcast it up.

    (x's element type needs no check: the pattern's constants are floats, and Add/Mul/Div take one type.)
    """
    rank = known_rank(x)
    for c in constants:
        if c is None:
            continue
        ndim = len(c.const.shape)
        if ndim and (rank is None or ndim > rank):
            return f"constant {c.name!r} of rank {ndim} could broadcast x (rank {rank if rank is not None else '?'})"
    return None


def _relu6_condition(x: Value, clip: Node, lo, hi, three, k) -> str | None:
    if _clip_bounds(clip, lo, hi) != (0.0, 6.0):
        return f"Clip bounds {_clip_bounds(clip, lo, hi)}, expected (0, 6)"
    return _scalar_shapes_ok(x, three, k, lo, hi)


def _opset_ok(ctx: MatchContext) -> str | None:
    opset = ctx.model.opset() or 0
    return None if opset >= HARDSWISH_OPSET else f"HardSwish needs opset {HARDSWISH_OPSET}, the model has {opset}"


def _hardsigmoid(op, x):
    return op.HardSigmoid(x, alpha=SIXTH, beta=0.5)


# -- HardSigmoid: Clip(x + 3, 0, 6) / 6 ------------------------------------------------------------------------------
def _hs_condition(ctx: MatchContext, x, lo, hi, three, k, clip) -> bool | str:
    return _relu6_condition(x, clip, lo, hi, three, k) or True


HARDSIGMOID_DIV = Rule(
    "hardsigmoid-div",
    lambda op, x: op.Div(_relu6_of_x_plus_3(op, x), op.const("k", where=_scalar(6.0))),
    lambda op, x: _hardsigmoid(op, x), _hs_condition)
HARDSIGMOID_MUL = Rule(
    "hardsigmoid-mul",
    lambda op, x: op.Mul(_relu6_of_x_plus_3(op, x), op.const("k", where=_scalar(SIXTH)), _commute=True),
    lambda op, x: _hardsigmoid(op, x), _hs_condition)


# -- HardSwish -------------------------------------------------------------------------------------------------------
def _hswish_condition(ctx: MatchContext, x, lo, hi, three, k, clip) -> bool | str:
    return _relu6_condition(x, clip, lo, hi, three, k) or True


def _hardswish(op, ctx: MatchContext, x: Value) -> Value:
    """HardSwish where the opset has it (14+), else ``x * HardSigmoid(x)`` (what exporters emit there)."""
    return op.HardSwish(x) if _opset_ok(ctx) is None else op.Mul(x, _hardsigmoid(op, x))


HARDSWISH_DIV = Rule(
    "hardswish-div",
    lambda op, x: op.Div(op.Mul(x, _relu6_of_x_plus_3(op, x), _commute=True), op.const("k", where=_scalar(6.0))),
    _hardswish, _hswish_condition)
HARDSWISH_MUL = Rule(
    "hardswish-mul",
    lambda op, x: op.Mul(op.Mul(x, _relu6_of_x_plus_3(op, x), _commute=True), op.const("k", where=_scalar(SIXTH)),
                         _commute=True),
    _hardswish, _hswish_condition)


def _hswish_hs_condition(ctx: MatchContext, x, hs) -> bool | str:
    alpha, beta = float(hs.attr("alpha", 0.2)), float(hs.attr("beta", 0.5))
    if not (math.isclose(alpha, SIXTH, rel_tol=1e-6) and beta == 0.5):
        return f"HardSigmoid alpha={alpha}, beta={beta}; HardSwish is alpha=1/6, beta=0.5"
    return _opset_ok(ctx) or _scalar_shapes_ok(x) or True


HARDSWISH_HARDSIGMOID = Rule(
    "hardswish-hardsigmoid",
    lambda op, x: op.Mul(x, op.HardSigmoid(x, _name="hs"), _commute=True),
    lambda op, x: op.HardSwish(x), _hswish_hs_condition)


# -- Relu and Clip ---------------------------------------------------------------------------------------------------
def _merged_bounds(clip: Node, lo: Value | None, hi: Value | None) -> tuple[float, float] | str:
    low, high = _clip_bounds(clip, lo, hi)
    if high < 0:
        return f"Clip max {high} < 0: the result is constant, not a Clip of x"
    return max(low, 0.0), high


def _bound_dtype(x: Value, lo: Value | None, hi: Value | None) -> np.dtype | None:
    """The element type of the Clip (its bounds have x's type)."""
    bound = lo if lo is not None else hi
    if bound is not None:
        return const_array(bound).dtype
    return None if x.elem_type is None else numpy_dtype(x.elem_type)


def _relu_clip_condition(ctx: MatchContext, x, lo, hi, clip) -> bool | str:
    if (ctx.model.opset() or 0) >= 11 and _bound_dtype(x, lo, hi) is None:
        return "x's element type is unknown (needed for the new min bound)"
    merged = _merged_bounds(clip, lo, hi)
    return merged if isinstance(merged, str) else True


def _merged_clip(op, ctx: MatchContext, x: Value, clip: Node, lo: Value | None, hi: Value | None) -> Value:
    """``Clip(x, max(lo, 0), hi)``, with bounds as attributes before opset 11 and as inputs since."""
    low, high = _merged_bounds(clip, lo, hi)
    if (ctx.model.opset() or 0) < 11:
        return op.Clip(x, **({"min": low} if math.isinf(high) else {"min": low, "max": high}))
    if lo is None or float(const_array(lo).reshape(-1)[0]) != low:
        lo = op.const(np.asarray(low, dtype=_bound_dtype(x, lo, hi)), name=f"{clip.name or 'clip'}_min")
    return op.Clip(x, lo, hi) if hi is not None else op.Clip(x, lo)


RELU_CLIP = Rule(
    "relu-clip",
    lambda op, x: op.Clip(op.Relu(x), op.opt(op.const("lo")), op.opt(op.const("hi")), _name="clip"),
    lambda op, ctx, x, lo, hi, clip: _merged_clip(op, ctx, x, clip, lo, hi), _relu_clip_condition)
CLIP_RELU = Rule(
    "clip-relu",
    lambda op, x: op.Relu(op.Clip(x, op.opt(op.const("lo")), op.opt(op.const("hi")), _name="clip")),
    lambda op, ctx, x, lo, hi, clip: _merged_clip(op, ctx, x, clip, lo, hi), _relu_clip_condition)


@register_pass
class FuseHardActivations(RewritePass):
    name = "fuse-hard-activations"
    description = "x * Clip(x + 3, 0, 6) / 6 -> HardSwish, Clip(x + 3, 0, 6) / 6 -> HardSigmoid, Relu + Clip -> Clip"
    level = "fuse"
    lossless = True
    rules = RuleSet([HARDSWISH_DIV, HARDSWISH_MUL, HARDSIGMOID_DIV, HARDSIGMOID_MUL, HARDSWISH_HARDSIGMOID,
                     RELU_CLIP, CLIP_RELU])
