"""Gemm/MatMul fusions: fold BatchNormalization and per-column Mul/Add into constant weights, MatMul+Add -> Gemm.

A fully connected layer is ``Gemm(A, B, C)`` (``alpha * A' B' + beta * C``)
or ``MatMul(A, W)`` with a constant ``W`` of shape ``[K, N]``. Per output column
``n`` the result is linear in ``W[:, n]``, so a following per-column scale folds
into ``W`` and a per-column shift into ``C``. BatchNormalization normalizes
axis 1, which is the column axis only for a 2-D output: a Gemm output always,
a MatMul output only when ``A`` is known to be 2-D.

Passes (level "fuse", lossless: results differ by float rounding only):

- ``fold-linear-batchnorm``: ``gemm-batchnorm``, ``matmul-batchnorm`` (the latter leaves
  ``MatMul(A, W') + t``, which ``matmul-add-to-gemm`` can turn into a Gemm).
- ``fold-linear-scale-bias``: ``gemm-mul``, ``gemm-div``, ``gemm-add``, ``gemm-sub``,
  ``matmul-mul``, ``matmul-div``.
- ``matmul-add-to-gemm``: ``matmul-add-gemm``, for a 2-D ``A``, a constant 2-D ``W`` and a bias broadcast
  along the columns.

Is Gemm faster than MatMul + Add in onnxruntime 1.32 (CPU, 2 threads)? At ORT_ENABLE_BASIC and above,
onnxruntime fuses 2-D MatMul + Add into the very same Gemm itself (its graphs for both inputs were compared:
identical but for explicitly written default attributes), so the rewrite cannot be slower there and timing
differences were within the A/A noise of the machine. At ORT_DISABLE_ALL, and for runtimes without that
fusion, Gemm was 2-30 % faster (MLPs and single layers, M = 1..256, K, N = 256..3072). So it stays.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Node, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet

from .channels import (
    batchnorm_affine,
    channel_vector,
    const_array,
    copy_attrs,
    finite,
    float_weight,
    known_rank,
    per_channel,
    scale_axis,
)


def _gemm(op, a, w, c):
    return op.Gemm(a, op.const("w"), op.opt(op.const("c")), _name="gemm")


def _gemm_columns(gemm: Node, weight: np.ndarray) -> int:
    return weight.shape[0] if gemm.attr("transB", 0) else weight.shape[1]


def _gemm_problem(gemm: Node, w: Value, c: Value | None) -> str | None:
    reason = float_weight(w)
    if reason:
        return reason
    weight = const_array(w)
    if weight.ndim != 2:
        return f"Gemm B of rank {weight.ndim}"
    bias = const_array(c)
    if bias is not None and bias.ndim > 2:
        return f"Gemm C of rank {bias.ndim}"
    return finite(weight, bias)


def _rebuild_gemm(op, gemm: Node, a: Value, w: Value, c: Value | None, scale: np.ndarray | None,
                  shift: np.ndarray | None) -> Value:
    """The Gemm computing ``gemm(a) * scale + shift`` per output column (either may be None)."""
    weight = const_array(w)
    dtype = weight.dtype
    w_value = w
    if scale is not None:
        w_value = op.const(scale_axis(weight, scale, 0 if gemm.attr("transB", 0) else 1), name=f"{w.name}_folded")
    bias = const_array(c)
    beta = float(gemm.attr("beta", 1.0))
    new_bias = None if bias is None else bias.astype(np.float64) * beta
    if scale is not None and new_bias is not None:
        new_bias = new_bias * scale  # broadcasts along the last (column) axis
    if shift is not None:
        new_bias = shift if new_bias is None else new_bias + shift
    if new_bias is None:
        return op.Gemm(a, w_value, **copy_attrs(gemm))
    c_value = op.const(new_bias.astype(dtype), name=f"{(c or w).name}_folded")
    return op.Gemm(a, w_value, c_value, **copy_attrs(gemm, beta=1.0))


def _matmul_problem(a: Value, w: Value) -> str | None:
    reason = float_weight(w)
    if reason:
        return reason
    weight = const_array(w)
    if weight.ndim != 2:
        return f"MatMul weight of rank {weight.ndim}, expected [K, N]"
    return finite(weight)


def _matmul_out_rank(a: Value) -> int | None:
    rank = known_rank(a)
    return None if rank is None else max(rank, 2) if rank >= 2 else 1


# -- BatchNormalization after Gemm / MatMul --------------------------------------------------------------------------
def _bn(op, inner):
    return op.BatchNormalization(inner, op.const("scale"), op.const("bias"), op.const("mean"), op.const("var"),
                                 _name="bn", training_mode=lambda v: not v)


def _gemm_bn_condition(ctx: MatchContext, w, c, scale, bias, mean, var, gemm, bn) -> bool | str:
    reason = _gemm_problem(gemm, w, c)
    if reason:
        return reason
    affine = batchnorm_affine(bn, scale, bias, mean, var, _gemm_columns(gemm, const_array(w)))
    return affine if isinstance(affine, str) else True


def _gemm_bn_replacement(op, a, w, c, scale, bias, mean, var, gemm, bn):
    s, t = batchnorm_affine(bn, scale, bias, mean, var, _gemm_columns(gemm, const_array(w)))
    return _rebuild_gemm(op, gemm, a, w, c, s, t)


GEMM_BATCHNORM = Rule("gemm-batchnorm", lambda op, a, w, c, scale, bias, mean, var: _bn(op, _gemm(op, a, w, c)),
                      _gemm_bn_replacement, _gemm_bn_condition)


def _matmul_bn_condition(ctx: MatchContext, a, w, scale, bias, mean, var, bn) -> bool | str:
    reason = _matmul_problem(a, w)
    if reason:
        return reason
    if known_rank(a) != 2:
        rank = known_rank(a)
        return ("the MatMul input's rank is unknown" if rank is None else
                f"the MatMul input has rank {rank}: BatchNormalization's axis 1 is not the column axis")
    affine = batchnorm_affine(bn, scale, bias, mean, var, const_array(w).shape[1])
    return affine if isinstance(affine, str) else True


def _matmul_bn_replacement(op, a, w, scale, bias, mean, var, bn):
    weight = const_array(w)
    s, t = batchnorm_affine(bn, scale, bias, mean, var, weight.shape[1])
    product = op.MatMul(a, op.const(scale_axis(weight, s, 1), name=f"{w.name}_folded"))
    return op.Add(product, op.const(t.astype(weight.dtype), name=f"{bn.outputs[0].name}_shift"))


MATMUL_BATCHNORM = Rule(
    "matmul-batchnorm",
    lambda op, a, w, scale, bias, mean, var: _bn(op, op.MatMul(a, op.const("w"), _name="mm")),
    _matmul_bn_replacement, _matmul_bn_condition)


@register_pass
class FoldLinearBatchNorm(RewritePass):
    name = "fold-linear-batchnorm"
    description = "Fold inference BatchNormalization into a Gemm, or a 2-D MatMul with constant weights, before it"
    level = "fuse"
    lossless = True
    rules = RuleSet([GEMM_BATCHNORM, MATMUL_BATCHNORM])


# -- per-column Mul / Div / Add / Sub after Gemm / MatMul ------------------------------------------------------------
def _column_vector(c: Value, rank: int | None, columns: int, op_type: str) -> np.ndarray | str:
    index = channel_vector(c.const.shape, rank, columns, axis=-1)
    if isinstance(index, str):
        return index
    vec = per_channel(const_array(c), index)
    if op_type == "Div" and not np.all(vec):
        return "division by a constant holding zeros"
    return 1.0 / vec if op_type == "Div" else -vec if op_type == "Sub" else vec


def _gemm_affine_rule(name: str, op_type: str, commute: bool) -> Rule:
    def target(op, a, w, c, k):
        return getattr(op, op_type)(_gemm(op, a, w, c), op.const("k"), _commute=commute)

    def condition(ctx: MatchContext, w, c, k, gemm) -> bool | str:
        reason = _gemm_problem(gemm, w, c) or finite(const_array(k))
        if reason:
            return reason
        if k.elem_type != w.elem_type:
            return "the constant's element type differs from the weight's"
        vec = _column_vector(k, 2, _gemm_columns(gemm, const_array(w)), op_type)
        return vec if isinstance(vec, str) else True

    def replacement(op, a, w, c, k, gemm):
        vec = _column_vector(k, 2, _gemm_columns(gemm, const_array(w)), op_type)
        if op_type in ("Mul", "Div"):
            return _rebuild_gemm(op, gemm, a, w, c, vec, None)
        return _rebuild_gemm(op, gemm, a, w, c, None, vec)

    return Rule(name, target, replacement, condition)


def _matmul_scale_rule(name: str, op_type: str, commute: bool) -> Rule:
    def target(op, a, w, k):
        return getattr(op, op_type)(op.MatMul(a, op.const("w"), _name="mm"), op.const("k"), _commute=commute)

    def condition(ctx: MatchContext, a, w, k) -> bool | str:
        reason = _matmul_problem(a, w) or finite(const_array(k))
        if reason:
            return reason
        if k.elem_type != w.elem_type:
            return "the constant's element type differs from the weight's"
        vec = _column_vector(k, _matmul_out_rank(a), const_array(w).shape[1], op_type)
        return vec if isinstance(vec, str) else True

    def replacement(op, a, w, k):
        weight = const_array(w)
        vec = _column_vector(k, _matmul_out_rank(a), weight.shape[1], op_type)
        return op.MatMul(a, op.const(scale_axis(weight, vec, 1), name=f"{w.name}_folded"))

    return Rule(name, target, replacement, condition)


LINEAR_SCALE_BIAS_RULES = RuleSet([
    _gemm_affine_rule("gemm-mul", "Mul", commute=True),
    _gemm_affine_rule("gemm-div", "Div", commute=False),
    _gemm_affine_rule("gemm-add", "Add", commute=True),
    _gemm_affine_rule("gemm-sub", "Sub", commute=False),
    _matmul_scale_rule("matmul-mul", "Mul", commute=True),
    _matmul_scale_rule("matmul-div", "Div", commute=False),
])


@register_pass
class FoldLinearScaleBias(RewritePass):
    name = "fold-linear-scale-bias"
    description = "Fold a scalar or per-column constant Mul/Div (and Add/Sub after Gemm) into Gemm/MatMul weights"
    level = "fuse"
    lossless = True
    rules = LINEAR_SCALE_BIAS_RULES


# -- MatMul + Add -> Gemm --------------------------------------------------------------------------------------------
def _matmul_add_condition(ctx: MatchContext, a, w, c) -> bool | str:
    reason = _matmul_problem(a, w)
    if reason:
        return reason
    if known_rank(a) != 2:
        rank = known_rank(a)
        return ("the MatMul input's rank is unknown" if rank is None else
                f"the MatMul input has rank {rank}; Gemm takes 2-D inputs only")
    index = channel_vector(c.const.shape, 2, const_array(w).shape[1], axis=-1)
    return index if isinstance(index, str) else True


def _matmul_add_replacement(op, a, w, c):
    weight = const_array(w)
    index = channel_vector(c.const.shape, 2, weight.shape[1], axis=-1)
    bias = const_array(c)
    if bias.ndim != 1 or bias.shape[0] != weight.shape[1]:
        bias = per_channel(bias, index).astype(bias.dtype)  # Gemm's C as [N]: one layout for every bias shape
        c = op.const(bias, name=f"{c.name}_gemm")
    return op.Gemm(a, w, c)


MATMUL_ADD_GEMM = Rule(
    "matmul-add-gemm",
    lambda op, a, w, c: op.Add(op.MatMul(a, op.const("w")), op.const("c"), _commute=True),
    _matmul_add_replacement, _matmul_add_condition)


@register_pass
class MatMulAddToGemm(RewritePass):
    name = "matmul-add-to-gemm"
    description = "MatMul(A, W) + bias -> Gemm for a 2-D A, constant 2-D W and a per-column (or scalar) bias"
    level = "fuse"
    lossless = True
    rules = RuleSet([MATMUL_ADD_GEMM])
