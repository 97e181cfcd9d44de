"""Conv fusions: fold BatchNormalization and per-channel Mul/Add into Conv weights, and Pad into Conv pads.

Exports made without constant folding emit ``Conv -> BatchNormalization``
(the zoo's TorchScript CNNs; its dynamo exports come folded), scale/shift
chains ``Conv -> Mul(c) -> Add(d)`` (normalization written out by hand),
and explicit ``Pad -> Conv`` (TF-style "same" padding). Each is one Conv with
different constants: fewer kernels, fewer intermediate tensors, and a graph
in which onnxruntime's own Conv+activation fusions see Conv directly followed
by the activation. All rules read the weights as constants (initializers);
a weight that is a graph input may be overridden at run time and is left alone.

onnxruntime folds Conv + BatchNormalization and Conv + Mul/Add itself from
ORT_ENABLE_BASIC on, so in onnxruntime these rewrites buy speed only at
ORT_DISABLE_ALL (measured 4-8 % on the zoo CNNs) and never cost any; they
matter for every consumer without those fusions (TVM lowering, accelerators,
quantization, which then sees one Conv per layer).

Passes (level "fuse", lossless: results differ by float rounding only):

- ``fold-conv-batchnorm``: ``conv-batchnorm`` (Conv or ConvTranspose, with or without bias, any group).
- ``fold-conv-scale-bias``: ``conv-mul``, ``conv-div``, ``conv-add``, ``conv-sub`` with a constant that
  is a scalar or a per-output-channel vector broadcast as ``[1, C, 1, ...]``.
- ``fuse-pad-conv``: ``pad-conv``, a zero constant Pad on spatial dims only.
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
    conv_out_channels,
    copy_attrs,
    finite,
    float_weight,
    per_channel,
    scale_conv_weight,
)

CONV_OPS = ("Conv", "ConvTranspose")


def _conv(op, x, w, b):
    return op.Any(x, op.const("w"), op.opt(op.const("b")), _ops=CONV_OPS, _name="conv")


def _conv_problem(conv: Node, w: Value, b: Value | None) -> str | None:
    """Why the weights of ``conv`` cannot be rewritten (None when they can)."""
    reason = float_weight(w)
    if reason:
        return reason
    weight = const_array(w)
    if weight.ndim < 3:
        return f"weight of rank {weight.ndim}: expected (M, C/group, k...)"
    bias = const_array(b)
    channels = conv_out_channels(conv, weight)
    if bias is not None and bias.shape != (channels,):
        return f"bias of shape {list(bias.shape)}, expected [{channels}]"
    return finite(weight, bias)


def _rebuild(op, conv: Node, x: Value, w: Value, b: Value | None, scale: np.ndarray | None,
             shift: np.ndarray | None) -> Value:
    """The Conv computing ``conv(x) * scale + shift`` per output channel (either may be None)."""
    weight = const_array(w)
    channels = conv_out_channels(conv, weight)
    bias = const_array(b)
    new_bias = np.zeros(channels) if bias is None else bias.astype(np.float64)
    if scale is not None:
        weight = scale_conv_weight(conv, weight, scale)
        new_bias = new_bias * scale
    if shift is not None:
        new_bias = new_bias + shift
    w_value = op.const(weight, name=f"{w.name}_folded") if scale is not None else w
    if bias is None and shift is None:
        b_value = None  # Conv(x) * s keeps no bias
    else:
        b_value = op.const(new_bias.astype(weight.dtype), name=f"{(b or w).name}_bias_folded")
    make = getattr(op, conv.op_type)
    inputs = (x, w_value) if b_value is None else (x, w_value, b_value)
    return make(*inputs, **copy_attrs(conv))


# -- Conv + BatchNormalization ---------------------------------------------------------------------------------------
def _conv_bn_target(op, x, w, b, scale, bias, mean, var):
    return op.BatchNormalization(_conv(op, x, w, b), op.const("scale"), op.const("bias"), op.const("mean"),
                                 op.const("var"), _name="bn", training_mode=lambda v: not v)


def _conv_bn_condition(ctx: MatchContext, w, b, scale, bias, mean, var, conv, bn) -> bool | str:
    reason = _conv_problem(conv, w, b)
    if reason:
        return reason
    affine = batchnorm_affine(bn, scale, bias, mean, var, conv_out_channels(conv, const_array(w)))
    return affine if isinstance(affine, str) else True


def _conv_bn_replacement(op, x, w, b, scale, bias, mean, var, conv, bn):
    s, t = batchnorm_affine(bn, scale, bias, mean, var, conv_out_channels(conv, const_array(w)))
    return _rebuild(op, conv, x, w, b, s, t)


CONV_BATCHNORM = Rule("conv-batchnorm", _conv_bn_target, _conv_bn_replacement, _conv_bn_condition)


@register_pass
class FoldConvBatchNorm(RewritePass):
    name = "fold-conv-batchnorm"
    description = "Fold inference BatchNormalization into the Conv/ConvTranspose weights and bias in front of it"
    level = "fuse"
    lossless = True
    rules = RuleSet([CONV_BATCHNORM])


# -- Conv + per-channel Mul / Div / Add / Sub --------------------------------------------------------------------------
def _affine_rule(name: str, op_type: str, commute: bool) -> Rule:
    """``Conv(x) <op_type> c`` folded into the Conv; ``commute`` lets ``c`` come first (Mul, Add)."""

    def target(op, x, w, b, c):
        return getattr(op, op_type)(_conv(op, x, w, b), op.const("c"), _commute=commute, _name="arith")

    def vector(conv: Node, w: Value, c: Value) -> np.ndarray | str:
        weight = const_array(w)
        channels = conv_out_channels(conv, weight)
        index = channel_vector(c.const.shape, weight.ndim, channels, axis=1)
        if isinstance(index, str):
            return index
        vec = per_channel(const_array(c), index)
        if op_type == "Div" and not np.all(vec):
            return "division by a constant holding zeros"
        return vec

    def condition(ctx: MatchContext, w, b, c, conv, arith) -> bool | str:
        reason = _conv_problem(conv, w, b) or finite(const_array(c))
        if reason:
            return reason
        if c.elem_type != w.elem_type:
            return "the constant's element type differs from the weight's"
        vec = vector(conv, w, c)
        return vec if isinstance(vec, str) else True

    def replacement(op, x, w, b, c, conv):
        vec = vector(conv, w, c)
        if op_type == "Mul":
            return _rebuild(op, conv, x, w, b, vec, None)
        if op_type == "Div":
            return _rebuild(op, conv, x, w, b, 1.0 / vec, None)
        return _rebuild(op, conv, x, w, b, None, vec if op_type == "Add" else -vec)

    return Rule(name, target, replacement, condition)


CONV_SCALE_BIAS_RULES = RuleSet([
    _affine_rule("conv-mul", "Mul", commute=True),
    _affine_rule("conv-div", "Div", commute=False),
    _affine_rule("conv-add", "Add", commute=True),
    _affine_rule("conv-sub", "Sub", commute=False),
])


@register_pass
class FoldConvScaleBias(RewritePass):
    name = "fold-conv-scale-bias"
    description = "Fold a scalar or per-output-channel constant Mul/Div/Add/Sub after a Conv into its weights and bias"
    level = "fuse"
    lossless = True
    rules = CONV_SCALE_BIAS_RULES


# -- Pad + Conv --------------------------------------------------------------------------------------------------------
def _pad_conv_target(op, x, w, b, pads, value, axes):
    padded = op.Pad(x, op.opt(op.const("pads")), op.opt(op.const("value")), op.opt(op.const("axes")), _name="pad")
    return op.Conv(padded, w, op.opt(b), _name="conv")


def _full_pads(pad: Node, pads: Value | None, axes: Value | None, w: Value) -> list[int] | str:
    """The Pad's [begin..., end...] over every input dim, or why it cannot be known."""
    amounts = pad.attr("pads") if pads is None else [int(p) for p in const_array(pads).reshape(-1)]
    if amounts is None:
        return "the Pad has no pads"
    if axes is None:
        return list(amounts)
    rank = len(w.shape) if w.shape is not None else None
    if rank is None:
        return "the Pad has axes and the Conv weight's rank is unknown"
    full = [0] * (2 * rank)
    chosen = [int(a) % rank for a in const_array(axes).reshape(-1)]
    for i, axis in enumerate(chosen):
        full[axis], full[axis + rank] = amounts[i], amounts[i + len(chosen)]
    return full


def _pad_value_is_zero(pad: Node, value: Value | None) -> bool:
    if value is None:
        return float(pad.attr("value", 0.0)) == 0.0
    array = const_array(value)
    return array.size == 0 or not np.any(array)  # -0.0 pads like +0.0 under a Conv


def _pad_conv_condition(ctx: MatchContext, w, pads, value, axes, pad, conv) -> bool | str:
    mode = pad.attr("mode", "constant")
    if mode != "constant":
        return f"Pad mode {mode!r}: only constant padding equals the Conv's implicit zeros"
    if not _pad_value_is_zero(pad, value):
        return "the Pad's constant value is not zero"
    if conv.attr("auto_pad", "NOTSET") != "NOTSET":
        return f"the Conv uses auto_pad={conv.attr('auto_pad')!r}"
    full = _full_pads(pad, pads, axes, w)
    if isinstance(full, str):
        return full
    rank = len(full) // 2
    if any(full[d] or full[d + rank] for d in (0, 1)):
        return "the Pad pads the batch or channel dimension"
    if any(p < 0 for p in full):
        return "the Pad crops (negative pads)"
    if w.shape is not None and len(w.shape) != rank:
        return f"the Pad covers {rank} dims, the Conv weight has rank {len(w.shape)}"
    return True


def _pad_conv_replacement(op, x, w, b, pads, axes, pad, conv):
    full = _full_pads(pad, pads, axes, w)
    rank = len(full) // 2
    spatial = rank - 2
    old = list(conv.attr("pads", [0] * (2 * spatial)))
    new = [old[i] + full[2 + i] for i in range(spatial)] + [old[spatial + i] + full[rank + 2 + i]
                                                               for i in range(spatial)]
    inputs = (x, w) if b is None else (x, w, b)
    return op.Conv(*inputs, **copy_attrs(conv, pads=new))


PAD_CONV = Rule("pad-conv", _pad_conv_target, _pad_conv_replacement, _pad_conv_condition)


@register_pass
class FusePadConv(RewritePass):
    name = "fuse-pad-conv"
    description = "Fold a zero constant Pad of the spatial dims into the pads of the Conv that reads it"
    level = "fuse"
    lossless = True
    rules = RuleSet([PAD_CONV])
