"""Transpose sinking: move Transposes below elementwise ops so that pairs meet and cancel.

Layout conversions (NHWC <-> NCHW from TF/TFLite converters, attention's
head transposes) come out of exporters as ``Transpose -> elementwise ->
Transpose``. Elementwise ops do not care about layout, so a Transpose can move
past them: ``f(T(x)) = T(f(x))``, ``T(x) + T(y) = T(x + y)`` for equal perms,
and ``T(x) + c = T(x + c')`` with ``c'`` the constant permuted back. Moved down
far enough, a Transpose lands on another Transpose and ``eliminate-noops``
(``transpose-pair-cancel`` / ``transpose-pair-compose`` in
``passes/simplify/noop.py``) removes or merges the pair.

Sinking never adds a Transpose: the unary and constant rules move one, the
two-input rule turns two into one. A Transpose whose output has other readers
stays (moving it would duplicate it). The constant rule fires only when the
constant cannot broadcast x to a bigger tensor (it is a scalar, or x's shape is
known), so the Transpose never ends up moving more data than before.

Pass (level "fuse", lossless: exact):

- ``sink-transposes``: ``transpose-unary``, ``transpose-clip``, ``transpose-binary``,
  ``transpose-binary-const`` (Transpose on the left), ``const-binary-transpose`` (on the right).
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.ir import Node, TensorType, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet

from .channels import const_array, copy_attrs, known_rank

UNARY_OPS = (
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil", "Celu", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish",
    "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign",
    "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
)
"""One input, one output of the same shape, each element computed from the same element of the input."""

BINARY_OPS = (
    "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Max", "Min", "Mod", "Mul", "Or", "Pow", "Sub", "Xor",
)
"""Two inputs under multidirectional broadcasting (Max/Min only with exactly two inputs)."""


def _perm(t: Node) -> list[int] | None:
    """The Transpose's permutation; the default reverses the dims, which needs the input's rank."""
    perm = t.attr("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = known_rank(t.inputs[0])
    return None if rank is None else list(reversed(range(rank)))


BOOL_RESULT_OPS = frozenset({"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsInf", "IsNaN"})


def _transposed(op, value: Value, t: Node, like: Node, source: Value) -> Value:
    """``Transpose(value)`` replacing ``like``'s output; ``value`` is ``like``'s op applied to ``source``.

    Types are carried over so the next sinking step still knows the shapes: the moved op's result has
    ``source``'s shape (the rules never let a constant broadcast it up), the Transpose has ``like``'s type.
    """
    if source.shape is not None and source.elem_type is not None:
        elem_type = (onnx.TensorProto.BOOL if like.op_type in BOOL_RESULT_OPS
                     else int(like.attr("to")) if like.op_type == "Cast" else source.elem_type)
        value.type = TensorType(elem_type, source.shape)
    perm = _perm(t)
    type_ = like.outputs[0].type
    if type_ is None and value.shape is not None:
        type_ = TensorType(value.elem_type, tuple(value.shape[p] for p in perm))
    return op.Transpose(value, perm=perm, _type=type_)


# -- unary -----------------------------------------------------------------------------------------------------------
def _unary_condition(ctx: MatchContext, t: Node) -> bool | str:
    return True if _perm(t) is not None else "the Transpose has no perm and its input rank is unknown"


def _unary_replacement(op, x, t, u):
    return _transposed(op, getattr(op, u.op_type)(x, _domain=u.domain, **copy_attrs(u)), t, u, x)


TRANSPOSE_UNARY = Rule(
    "transpose-unary",
    lambda op, x: op.Any(op.Transpose(x, _name="t"), _ops=UNARY_OPS, _name="u"),
    _unary_replacement, _unary_condition)


def _clip_replacement(op, x, lo, hi, t, u):
    inputs = [x, lo, hi]
    while inputs[-1] is None:
        inputs.pop()
    return _transposed(op, op.Clip(*inputs, **copy_attrs(u)), t, u, x)


TRANSPOSE_CLIP = Rule(  # Clip's min and max are scalars, so they do not care about layout either
    "transpose-clip",
    lambda op, x, lo, hi: op.Clip(op.Transpose(x, _name="t"), op.opt(lo), op.opt(hi), _name="u"),
    _clip_replacement, _unary_condition)


# -- binary, both sides transposed -----------------------------------------------------------------------------------
def _binary_condition(ctx: MatchContext, t1: Node, t2: Node) -> bool | str:
    p1, p2 = _perm(t1), _perm(t2)
    if p1 is None or p2 is None:
        return "a Transpose has no perm and its input rank is unknown"
    return True if p1 == p2 else f"the perms differ: {p1} and {p2}"


def _binary_replacement(op, x, y, t1, e):
    same = x.shape is not None and x.shape == y.shape and None not in x.shape
    return _transposed(op, getattr(op, e.op_type)(x, y, **copy_attrs(e)), t1, e, x if same else Value())


TRANSPOSE_BINARY = Rule(
    "transpose-binary",
    lambda op, x, y: op.Any(op.Transpose(x, _name="t1"), op.Transpose(y, _name="t2"), _ops=BINARY_OPS, _name="e"),
    _binary_replacement, _binary_condition)


# -- binary with a constant ------------------------------------------------------------------------------------------
def _permuted_back(c: Value, perm: list[int]) -> np.ndarray:
    """The constant ``c'`` with ``T(c') == c`` after padding ``c`` to the Transpose's rank."""
    array = const_array(c)
    padded = array.reshape((1,) * (len(perm) - array.ndim) + array.shape)
    return np.ascontiguousarray(np.transpose(padded, np.argsort(perm)))


def _const_condition(ctx: MatchContext, x: Value, c: Value, t: Node) -> bool | str:
    perm = _perm(t)
    if perm is None:
        return "the Transpose has no perm and its input rank is unknown"
    shape = c.const.shape
    if len(shape) > len(perm):
        return f"constant of rank {len(shape)} broadcasts the rank-{len(perm)} Transpose output up"
    if c.const.size == 1:
        return True
    if x.shape is None or len(x.shape) != len(perm):
        return "the constant is not a scalar and x's shape is unknown (it could broadcast x up)"
    out_shape = [x.shape[p] for p in perm]
    padded = (1,) * (len(perm) - len(shape)) + tuple(shape)
    for dim, size in zip(out_shape, padded, strict=True):
        if size != 1 and dim != size:
            return f"constant of shape {list(shape)} could broadcast the Transpose output {out_shape} up"
    return True


def _const_rule(name: str, transpose_first: bool) -> Rule:
    ops = (*BINARY_OPS, "PRelu") if transpose_first else BINARY_OPS

    def target(op, x):
        t = op.Transpose(x, _name="t")
        c = op.const("c")
        return op.Any(*((t, c) if transpose_first else (c, t)), _ops=ops, _name="e")

    def replacement(op, x, c, t, e):
        moved = op.const(_permuted_back(c, _perm(t)), name=f"{c.name}_transposed")
        inputs = (x, moved) if transpose_first else (moved, x)
        return _transposed(op, getattr(op, e.op_type)(*inputs, **copy_attrs(e)), t, e, x)

    return Rule(name, target, replacement, _const_condition)


TRANSPOSE_BINARY_CONST = _const_rule("transpose-binary-const", transpose_first=True)
CONST_BINARY_TRANSPOSE = _const_rule("const-binary-transpose", transpose_first=False)


@register_pass
class SinkTransposes(RewritePass):
    name = "sink-transposes"
    description = "Move Transposes below elementwise ops (T(x) op T(y) -> T(x op y)) so eliminate-noops can cancel them"
    level = "fuse"
    lossless = True
    rules = RuleSet([TRANSPOSE_UNARY, TRANSPOSE_CLIP, TRANSPOSE_BINARY, TRANSPOSE_BINARY_CONST,
                     CONST_BINARY_TRANSPOSE])
