"""Scales and zero points: activations (uint8/int8, symmetric or not), int8 weights, int32 biases."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32 scalar or 1-D (per channel)
    zero_point: np.ndarray  # same shape, in the quantized dtype
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def qrange(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def activation_qparams(lo: float, hi: float, dtype: np.dtype, symmetric: bool) -> QParams:
    """Affine parameters covering [lo, hi] (widened to hold 0, which must stay exact).

    Asymmetric uint8 of a range starting at 0 gets zero point 0, so the QuantizeLinear clamps negatives
    exactly like the Relu it replaces.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = qrange(dtype)
    if symmetric:
        bound = max(-lo, hi)
        scale = bound * 2 / (qmax - qmin) if bound > 0 else 1.0
        zp = (qmin + qmax + 1) // 2
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return QParams(np.array(scale, np.float32), np.array(zp, dtype))


def fake_quant(x: np.ndarray, qp: QParams) -> np.ndarray:
    """dequantize(quantize(x)) with onnxruntime's rounding (half to even) and saturation."""
    qmin, qmax = qrange(qp.dtype)
    scale, zp = _broadcast(qp, x.ndim)
    return ((np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int | None, reduce_range: bool = False) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 (zero point 0, range +-127, or +-63 with ``reduce_range``) per channel or per tensor."""
    bound = 63 if reduce_range else 127
    w = np.asarray(w, np.float32)
    if axis is None:
        absmax = np.array(np.abs(w).max() if w.size else 0.0)
    else:
        absmax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    # An all-zero channel still needs a positive scale: the bias scale is input scale x weight scale.
    floor = max(float(absmax.max()) * 1e-7, 1e-12)
    scale = (np.maximum(absmax, floor) / bound).astype(np.float32)
    qp = QParams(scale, np.zeros(scale.shape, np.int8), axis)
    s, _ = _broadcast(qp, w.ndim)
    return np.clip(np.round(w / s), -bound, bound).astype(np.int8), qp


def quantize_bias(b: np.ndarray, x_scale: np.ndarray, w: QParams) -> tuple[np.ndarray, QParams, int]:
    """int32 bias with scale x_scale * w_scale and zero point 0 (what QLinearConv/QGemm add in int32).

    Returns (quantized, params, number of saturated entries).
    """
    scale = (np.float32(x_scale) * w.scale).astype(np.float32)
    scale = np.broadcast_to(scale, b.shape).copy() if scale.ndim else scale
    q = np.round(np.asarray(b, np.float64) / scale)
    saturated = int(np.count_nonzero(np.abs(q) > INT32_MAX))
    axis = 0 if scale.ndim else None
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32), QParams(scale, np.zeros(scale.shape, np.int32),
                                                                        axis), saturated


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(max(signal, 1e-30) / noise)


def _broadcast(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if qp.axis is None or qp.scale.ndim == 0:
        return qp.scale, qp.zero_point.astype(np.float32)
    shape = [1] * ndim
    shape[qp.axis] = -1
    return qp.scale.reshape(shape), qp.zero_point.astype(np.float32).reshape(shape)
