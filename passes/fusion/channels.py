"""Per-channel arithmetic shared by the Conv and Gemm/MatMul folding rules (no passes here).

Folding ``BatchNormalization``, ``Mul`` or ``Add`` into the op in front of it is
the same algebra every time: the op computes ``y[c] = sum(W[c] * x) + b[c]``
along one output-channel axis, and a per-channel affine map ``y * s + t``
becomes ``W' = W * s`` (scaled along the output-channel axis of the weight)
and ``b' = b * s + t``. What differs between ops is only *where* the output
channels sit in the weight and the output. These helpers say whether a
constant is a per-channel vector for that axis (and why not), and scale a
weight along it. Arithmetic is done in float64 and cast back to the weight's
dtype, so the folded weights differ from the unfolded computation by float
noise only.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.ir import Node, Value

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})
"""Element types whose weights can be rescaled in numpy and cast back (bfloat16 has no numpy dtype)."""


def const_array(value: Value | None) -> np.ndarray | None:
    """The array of a constant value (``None`` for a missing optional input)."""
    return None if value is None or value.const is None else value.const.numpy()


def float_weight(value: Value) -> str | None:
    """Why ``value`` cannot be rescaled (None: it is a finite float constant)."""
    if value.const is None:
        return f"{value.name!r} is not a constant"
    if value.const.elem_type not in FLOAT_TYPES:
        return f"{value.name!r} is not a float16/float/double tensor"
    return None


def finite(*arrays: np.ndarray | None) -> str | None:
    """Folding a NaN or Inf into a weight changes results (0 * inf is NaN): refuse them."""
    for array in arrays:
        if array is not None and not np.all(np.isfinite(array)):
            return "a constant holds NaN or Inf"
    return None


def channel_vector(shape: tuple[int, ...], rank: int | None, channels: int, axis: int) -> np.ndarray | str:
    """How a constant of ``shape`` broadcasts against an output of ``rank`` with ``channels`` at ``axis``.

    Returns the index map (an int array of length ``channels`` picking, per channel, the flat element of
    the constant) or the reason the constant is not per-channel: it must not add dimensions to the
    output (its rank is at most the output's, and the output's rank must be known when it has more
    than one dimension), and every dimension but ``axis`` must be 1.
    """
    if rank is None:
        if len(shape) > 1:
            return f"constant of shape {list(shape)}: the output rank is unknown"
        rank = max(len(shape), axis + 1) if axis >= 0 else max(len(shape), 1)
    if len(shape) > rank:
        return f"constant of shape {list(shape)} has more dimensions than the output (rank {rank})"
    axis = axis % rank
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    for i, dim in enumerate(padded):
        if i == axis:
            if dim not in (1, channels):
                return f"constant of shape {list(shape)} has {dim} elements on the channel axis, not 1 or {channels}"
        elif dim != 1:
            return f"constant of shape {list(shape)} varies along axis {i}, not only the channel axis {axis}"
    return np.arange(channels) if padded[axis] == channels else np.zeros(channels, dtype=np.int64)


def per_channel(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The per-channel float64 vector of a constant, given :func:`channel_vector`'s index map."""
    return np.asarray(array, dtype=np.float64).reshape(-1)[index]


def batchnorm_affine(bn: Node, scale: Value, bias: Value, mean: Value, var: Value,
                     channels: int) -> tuple[np.ndarray, np.ndarray] | str:
    """Inference BatchNormalization as ``y * s + t`` per channel, or why it is not foldable.

    ``Y = (X - mean) / sqrt(var + eps) * scale + bias`` over axis 1, so ``s = scale / sqrt(var + eps)``
    and ``t = bias - mean * s``.
    """
    if bn.attr("spatial", 1) != 1:
        return "spatial=0 BatchNormalization (per-activation statistics)"
    arrays = [const_array(v) for v in (scale, bias, mean, var)]
    for name, array in zip(("scale", "B", "mean", "var"), arrays, strict=True):
        if array.shape != (channels,):
            return f"BatchNormalization {name} has shape {list(array.shape)}, expected [{channels}]"
    reason = finite(*arrays)
    if reason:
        return reason
    gamma, beta, mu, sigma2 = (a.astype(np.float64) for a in arrays)
    s = gamma / np.sqrt(sigma2 + float(bn.attr("epsilon", 1e-5)))
    return s, beta - mu * s


def scale_axis(weight: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` scaled by vector ``s`` along ``axis``, in float64, cast back to ``weight``'s dtype."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (weight.astype(np.float64) * s.reshape(shape)).astype(weight.dtype)


def conv_out_channels(conv: Node, weight: np.ndarray) -> int:
    """Output channels of a Conv (W is (M, C/group, k...)) or ConvTranspose (W is (C, M/group, k...))."""
    if conv.op_type == "ConvTranspose":
        return weight.shape[1] * int(conv.attr("group", 1))
    return weight.shape[0]


def scale_conv_weight(conv: Node, weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Scale output channel ``o`` of a Conv or ConvTranspose weight by ``s[o]``.

    ConvTranspose's weight is (C_in, C_out/group, k...): output channel ``o = g * C_out/group + j`` of
    group ``g`` lives at ``W[g * C_in/group + i, j]``, so the scale is laid out per group.
    """
    if conv.op_type != "ConvTranspose":
        return scale_axis(weight, s, 0)
    group = int(conv.attr("group", 1))
    c_in, c_out_g = weight.shape[0], weight.shape[1]
    blocked = weight.astype(np.float64).reshape(group, c_in // group, c_out_g, -1)
    scaled = blocked * s.reshape(group, 1, c_out_g, 1)
    return scaled.reshape(weight.shape).astype(weight.dtype)


def copy_attrs(node: Node, **changes: object) -> dict[str, object]:
    """``node``'s attributes as keyword arguments for the replacement builder, with ``changes`` applied."""
    attrs: dict[str, object] = {name: attr for name, attr in node.attrs.items()}
    attrs.update(changes)
    return attrs


RANK_PRESERVING_OPS = frozenset({
    "Abs", "Cast", "Ceil", "Clip", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Log", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus", "Softsign",
    "Sqrt", "Tanh", "Dropout", "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "Transpose",
})
"""Ops whose first output has the rank of their first input."""


def known_rank(value: Value | None, depth: int = 16) -> int | None:
    """The rank of ``value``: from its type, else through a chain of rank-preserving producers back to
    a typed value (exporters type graph inputs and outputs, rarely what lies between). Gemm is 2-D."""
    for _ in range(depth):
        if value is None:
            return None
        if value.shape is not None:
            return len(value.shape)
        producer = value.producer
        if producer is None or producer.domain not in ("", "ai.onnx") or value.index != 0:
            return None
        if producer.op_type == "Gemm":
            return 2
        if producer.op_type not in RANK_PRESERVING_OPS or not producer.inputs:
            return None
        value = producer.inputs[0]
    return None
