"""LayerNorm and RMSNorm fusion: decomposed normalizations -> one normalization op.

Exporters at opset < 17 (and hand-written models) spell LayerNorm as
``ReduceMean, Sub, Pow|Mul, ReduceMean, Add eps, Sqrt, Div|Mul(Reciprocal), Mul gamma, Add beta``
and RMSNorm as ``Pow|Mul, ReduceMean, Add eps, Sqrt, Reciprocal+Mul|Div, Mul gamma``. The core
(normalization without gamma/beta) becomes the fused op with scale 1; separate rules then fold a
constant ``Mul`` / ``Add`` that follows a fused op into its scale / bias, so every affine form (gamma
only, gamma and beta, none, either operand order) is covered by four small rules.

Targets, measured with ``python tools/measure_attention_ops.py ops --family norm --batch 1 8 --runs 40
--levels basic all`` (onnxruntime 1.32 CPU, 2 threads, spinning off; [8, 128, 768] after a residual
Add, median CPU ms of interleaved runs; batch 1 showed the same order)::

                                            ORT_ENABLE_BASIC  ORT_ENABLE_ALL
    Add + decomposed LayerNorm                    1.05            5.20  (ALL fuses it to SkipLayerNorm)
    Add + LayerNormalization                      1.14            5.14  (same)
    com.microsoft SkipLayerNormalization          5.80            5.70
    Add + decomposed RMSNorm                      1.27            1.33
    Add + SimplifiedLayerNormalization            0.97            0.90
    Add + RMSNormalization (opset 23)             0.80            0.81
    com.microsoft SkipSimplifiedLayerNorm         1.47            1.50

- LayerNorm -> ``LayerNormalization`` (opset 17+); older opsets are refused (the op does not exist
  there, and raising a model's opset is not lossless for its other ops).
- onnxruntime's ``SkipLayerNormalization`` (residual Add folded in) is 4-6x slower than Add +
  LayerNormalization, and ORT_ENABLE_ALL creates it by itself wherever it can prove both Add inputs
  have one shape (which graphopt's shape inference makes possible). So the residual Add feeding a norm
  becomes ``Sum`` (same math; measured as fast as Add), which onnxruntime does not fuse: rule
  ``layer-norm-residual-sum``. onnxruntime.transformers.optimizer fuses SkipLayerNormalization and pays
  for it (7 % of BERT-base's run time here).
- RMSNorm -> ``RMSNormalization`` when the model imports opset 23+, else onnxruntime's
  ``SimplifiedLayerNormalization`` (a contrib op registered in the default domain at every opset; what
  ORT_ENABLE_ALL itself fuses RMSNorm into). Raising the opset just for RMSNorm is never done.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Model, Node, Value
from graphopt.ir.tensor import numpy_dtype
from graphopt.pipeline import PassContext, PassResult, register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet
from graphopt.shapes import ensure_shapes

FLOAT_TYPES = frozenset({1, 10, 11})  # float32, float16, float64: what LayerNormalization runs on in ORT's CPU EP
RMS_OPS = frozenset({"RMSNormalization", "SimplifiedLayerNormalization"})
NORM_OPS = RMS_OPS | {"LayerNormalization"}


# ------------------------------------------------------------------------------------------ helpers


class ShapeAwareRewritePass(RewritePass):
    """A rewrite pass whose conditions read value types (ranks, the last dim, the element type):
    shapes are inferred first, unless no value became inferable since the model's last inference."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        roots = frozenset().union(*(rule.root_ops for rule in self.rules))
        if any(node.op_type in roots for node in model.nodes()):
            ensure_shapes(model)
        return super().run(model, ctx)


def scalar(value: Value | None) -> float | None:
    """The number a scalar constant holds (shape [] or [1]: a [1, 1, 1] one could raise the rank of what it
    is combined with, so it does not count), else None."""
    if value is None or value.const is None or value.const.size != 1 or len(value.const.shape) > 1:
        return None
    return float(value.const.numpy().reshape(-1)[0])


#: Ops whose output holds only values of input 0 (so a uniform input gives a uniform output).
_SAME_ELEMENTS = frozenset({"Expand", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})
UNIFORM_MAX_ELEMENTS = 1 << 16


def uniform_value(value: Value | None, depth: int = 8) -> float | None:
    """The number every element of ``value`` is known to equal (a bool as 0/1), else None: through constants,
    ``ConstantOfShape``, ``Where`` and ops that only move or repeat elements, so a tensor of run-time shape
    built from a constant (an exporter's "no mask" mask, ``Expand(0, [B, 1, S, S])``) is recognised."""
    if value is None or depth == 0:
        return None
    if value.const is not None:
        if not 0 < value.const.size <= UNIFORM_MAX_ELEMENTS:
            return None
        flat = value.const.numpy().reshape(-1)
        return float(flat[0]) if np.all(flat == flat[0]) else None
    node = value.producer
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _SAME_ELEMENTS:
        return uniform_value(node.inputs[0], depth - 1)
    if node.op_type == "ConstantOfShape":
        fill = node.attr("value")
        return 0.0 if fill is None else float(fill.numpy().reshape(-1)[0])
    if node.op_type == "Where":
        cond = uniform_value(node.inputs[0], depth - 1)
        if cond is not None:
            return uniform_value(node.inputs[1] if cond else node.inputs[2], depth - 1)
        a, b = uniform_value(node.inputs[1], depth - 1), uniform_value(node.inputs[2], depth - 1)
        return a if a is not None and a == b else None
    return None


def reduce_axes(node: Node) -> list[int] | None:
    """Axes of a ReduceMean (attribute before opset 18, constant input since), None if not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = node.inputs[1].const
        return None if axes is None else [int(a) for a in axes.numpy().reshape(-1)]
    axes = node.attr("axes")
    return None if axes is None else [int(a) for a in axes]


def last_axis_reduction(node: Node, x: Value) -> str | None:
    """Why ``node`` (a ReduceMean of ``x`` or of something shaped like it) is not a keepdims mean over the
    last axis, or None if it is."""
    if node.attr("keepdims", 1) != 1:
        return f"{node.label()} does not keep dims"
    axes = reduce_axes(node)
    rank = len(x.shape) if x.shape is not None else None
    if axes is None:
        return f"{node.label()}: axes are not constant"
    if axes != [-1] and not (rank is not None and axes in ([rank - 1], [-1])):
        return f"{node.label()}: reduces axes {axes}, only the last axis is fused (rank {rank})"
    return None


def last_dim(x: Value) -> int | None:
    shape = x.shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def check_input(ctx: MatchContext, x: Value, square: Node, *, opset: int = 0) -> str | None:
    """Shared conditions: float input with a known last dim, x*x or x**2 as the square, the opset."""
    if x.elem_type not in FLOAT_TYPES:
        return f"input {x.name!r} is not a float tensor (elem_type {x.elem_type})"
    if last_dim(x) is None:
        return f"the last dim of {x.name!r} is unknown (shape {x.shape}); run infer-shapes first"
    if square.op_type == "Pow" and scalar(square.inputs[1]) != 2.0:
        return f"{square.label()} is not a square (exponent {scalar(square.inputs[1])})"
    if square.op_type == "Mul" and square.inputs[0] is not square.inputs[1]:
        return f"{square.label()} multiplies two different values"
    if (ctx.model.opset() or 0) < opset:
        return f"the model imports opset {ctx.model.opset()}, the fused op needs {opset}"
    return None


def epsilon(eps: Value) -> str | float:
    value = scalar(eps)
    if value is None or not value >= 0:
        return f"epsilon {eps.name!r} is not a non-negative scalar constant"
    return value


def affine_constant(c: Value, node: Node) -> str | None:
    """A constant that may fold into a normalization's scale/bias: one value per normalized element,
    broadcast only along the last axis, never adding dims to the output."""
    x = node.inputs[0]
    d = last_dim(x)
    shape = c.const.shape
    rank = len(x.shape) if x.shape is not None else None
    if c.const.size not in (1, d) or (shape and shape[-1] not in (1, d)):
        return f"constant {c.name!r} of shape {list(shape)} does not broadcast along the last axis only"
    if len(shape) > 1 and (rank is None or len(shape) > rank):
        return f"constant {c.name!r} of shape {list(shape)} could add dims to the output"
    return None


def per_channel(c: Value, d: int, dtype: np.dtype) -> np.ndarray:
    return np.broadcast_to(c.const.numpy().reshape(-1), (d,)).astype(dtype)


# ------------------------------------------------------------------------------------------ LayerNorm


def normalized(op, x, std, form: str):
    """x / std in the three ways exporters write it: "div" (x / std), "reciprocal" (x * Reciprocal(std)),
    "one-div" (x * (1 / std), torch.rsqrt through the TorchScript exporter)."""
    if form == "div":
        return op.Div(x, std)
    inverse = op.Reciprocal(std) if form == "reciprocal" else op.Div(op.const("one"), std)
    return op.Mul(x, inverse, _commute=True)


def inverse_ok(one: Value | None) -> str | None:
    if one is not None and scalar(one) != 1.0:
        return f"{one.name!r} is {scalar(one)}: not 1 / std"
    return None


def _layer_norm_target(form: str):
    def target(op, x, sq):
        diff = op.Sub(x, op.ReduceMean(x, op.opt(op.const()), _name="mean"))
        var = op.ReduceMean(op.Any(diff, sq, _ops={"Pow", "Mul"}, _name="square"), op.opt(op.const()), _name="var")
        return normalized(op, diff, op.Sqrt(op.Add(var, op.const("eps"), _commute=True)), form)

    return target


def _layer_norm_condition(ctx: MatchContext, x: Value, eps: Value, mean: Node, var: Node, square: Node,
                          one: Value | None = None):
    if inverse_ok(one):
        return inverse_ok(one)
    for reduce in (mean, var):
        why = last_axis_reduction(reduce, x)
        if why:
            return why
    why = check_input(ctx, x, square, opset=17)
    if why:
        return why
    value = epsilon(eps)
    return value if isinstance(value, str) else True


def _layer_norm_replacement(op, x: Value, eps: Value, ctx: MatchContext) -> Value:
    ones = np.ones(last_dim(x), numpy_dtype(x.elem_type))
    return op.LayerNormalization(x, op.const(ones), axis=-1, epsilon=scalar(eps), _type=ctx.root.outputs[0])


def _fold_scale_target(ops: frozenset[str]):
    def target(op, x):
        norm = op.Any(x, op.const("s"), op.opt(op.const("b")), _ops=ops, _name="norm")
        return op.Mul(norm, op.const("g"), _commute=True)

    return target


def _fold_condition(ctx: MatchContext, norm: Node, g: Value | None = None, c: Value | None = None):
    shape, axis = norm.inputs[0].shape, norm.attr("axis", -1)
    if axis != -1 and not (shape is not None and axis == len(shape) - 1):
        return f"{norm.label()} normalizes from axis {axis}, not only the last axis"
    if last_dim(norm.inputs[0]) is None:
        return f"the last dim of {norm.inputs[0].name!r} is unknown; run infer-shapes first"
    return affine_constant(g if g is not None else c, norm) or True


def _fold_scale(op, x: Value, s: Value, b: Value | None, g: Value, norm: Node, ctx: MatchContext) -> Value:
    """norm(x) * g: the fused op's scale (and bias) times g."""
    d, dtype = last_dim(x), numpy_dtype(x.elem_type)
    gamma = per_channel(g, d, dtype)
    inputs = [x, op.const(per_channel(s, d, dtype) * gamma)]
    if b is not None:
        inputs.append(op.const(per_channel(b, d, dtype) * gamma))
    return getattr(op, norm.op_type)(*inputs, _domain=norm.domain, _type=ctx.root.outputs[0],
                                     **{k: norm.attr(k) for k in norm.attrs})


def _fold_bias_target(op, x):
    norm = op.LayerNormalization(x, op.const("s"), op.opt(op.const("b")), _name="norm")
    return op.Add(norm, op.const("c"), _commute=True)


def _fold_bias(op, x: Value, s: Value, b: Value | None, c: Value, norm: Node, ctx: MatchContext) -> Value:
    """LayerNormalization(x) + c: c joins the bias."""
    d, dtype = last_dim(x), numpy_dtype(x.elem_type)
    bias = per_channel(c, d, dtype) + (per_channel(b, d, dtype) if b is not None else 0)
    return op.LayerNormalization(x, s, op.const(bias.astype(dtype)), _type=ctx.root.outputs[0],
                                 **{k: norm.attr(k) for k in norm.attrs})


def _residual_condition(ctx: MatchContext, a: Value, b: Value):
    if a.const is not None or b.const is not None:
        return "one operand is a constant (a bias, not a residual)"
    if not any(user.op_type in NORM_OPS for user in ctx.root.outputs[0].users()):
        return "the sum does not feed a LayerNormalization or RMSNorm"
    return True


def _residual_sum(op, a: Value, b: Value, ctx: MatchContext) -> Value:
    return op.Sum(a, b, _type=ctx.root.outputs[0])


# Residual Add -> Sum (2 inputs: the same broadcasting sum) where it feeds a LayerNorm or RMSNorm, so that
# ORT_ENABLE_ALL cannot turn Add + the norm into com.microsoft Skip(Simplified)LayerNormalization, which
# ran 2-5x slower than Add + the norm in onnxruntime 1.32 CPU (CPU ms, [8, 128, 768]: Add+LN 1.61,
# Sum+LN 1.49, SkipLN 9.2 at BASIC; Add+LN under ALL, i.e. fused to SkipLN, 5.5 vs Sum+LN 1.41).
RESIDUAL_SUM = Rule("layer-norm-residual-sum", lambda op, a, b: op.Add(a, b), _residual_sum, _residual_condition)

LAYER_NORM_RULES = RuleSet([
    *(Rule("layer-norm" + ("" if form == "div" else f"-{form}"), _layer_norm_target(form), _layer_norm_replacement,
           _layer_norm_condition) for form in ("div", "reciprocal", "one-div")),
    Rule("layer-norm-scale", _fold_scale_target(frozenset({"LayerNormalization"})), _fold_scale, _fold_condition),
    Rule("layer-norm-bias", _fold_bias_target, _fold_bias, _fold_condition),
    RESIDUAL_SUM,
])


@register_pass
class FuseLayerNorm(ShapeAwareRewritePass):
    name = "fuse-layer-norm"
    description = ("Decomposed LayerNorm (ReduceMean/Sub/Pow/Sqrt/Div, gamma, beta) -> LayerNormalization; "
                   "its residual Add -> Sum (keeps onnxruntime's slower SkipLayerNormalization away)")
    level = "fuse"
    rules = LAYER_NORM_RULES


# ------------------------------------------------------------------------------------------ RMSNorm


def _rms_norm_target(form: str):
    def target(op, x, sq):
        ms = op.ReduceMean(op.Any(x, sq, _ops={"Pow", "Mul"}, _name="square"), op.opt(op.const()), _name="mean")
        return normalized(op, x, op.Sqrt(op.Add(ms, op.const("eps"), _commute=True)), form)

    return target


def _rms_norm_condition(ctx: MatchContext, x: Value, eps: Value, mean: Node, square: Node, one: Value | None = None):
    why = inverse_ok(one) or last_axis_reduction(mean, x) or check_input(ctx, x, square)
    if why:
        return why
    value = epsilon(eps)
    return value if isinstance(value, str) else True


def _rms_norm_replacement(op, x: Value, eps: Value, ctx: MatchContext) -> Value:
    ones = op.const(np.ones(last_dim(x), numpy_dtype(x.elem_type)))
    # below opset 23: onnxruntime's contrib op, registered in the default domain at every opset
    fused = op.RMSNormalization if (ctx.model.opset() or 0) >= 23 else op.SimplifiedLayerNormalization
    return fused(x, ones, axis=-1, epsilon=scalar(eps), _type=ctx.root.outputs[0])


RMS_NORM_RULES = RuleSet([
    *(Rule("rms-norm" + ("" if form == "reciprocal" else f"-{form}"), _rms_norm_target(form), _rms_norm_replacement,
           _rms_norm_condition) for form in ("reciprocal", "div", "one-div")),
    Rule("rms-norm-scale", _fold_scale_target(RMS_OPS), _fold_scale, _fold_condition),
    RESIDUAL_SUM,
])


@register_pass
class FuseRMSNorm(ShapeAwareRewritePass):
    name = "fuse-rms-norm"
    description = ("Decomposed RMSNorm -> RMSNormalization (opset 23+) or onnxruntime's "
                   "SimplifiedLayerNormalization")
    level = "fuse"
    rules = RMS_NORM_RULES
