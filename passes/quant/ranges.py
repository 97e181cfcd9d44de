"""Clipping ranges from activation statistics: min/max, percentile, entropy (KL) and MSE-optimal.

Every method reads a :class:`Histogram` of one tensor over the calibration data (exact min/max plus a
2048-bin histogram over [min, max] of a strided subsample, so calibration stays cheap on large models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINS = 2048
MAX_VALUES = 1 << 20  # values per tensor kept for the histogram (a uniform subsample of all seen)


@dataclass
class Histogram:
    """Exact min/max of a tensor over the calibration data, and a histogram of a bounded subsample."""

    lo: float = np.inf
    hi: float = -np.inf
    counts: np.ndarray | None = None  # BINS counts over [edge_lo, edge_hi], built by finish()
    edge_lo: float = 0.0
    edge_hi: float = 0.0
    values: list[np.ndarray] = field(default_factory=list)
    stride: int = 1  # keep every stride-th incoming value (doubles whenever MAX_VALUES is reached)

    def observe(self, lo: float, hi: float, values: np.ndarray | None = None) -> None:
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if values is not None and values.size:
            self.add_values(np.asarray(values, np.float32))

    def add_values(self, values: np.ndarray) -> None:
        self.values.append(values[:: self.stride])
        if sum(v.size for v in self.values) > MAX_VALUES:
            self.values = [np.concatenate(self.values)[::2]]
            self.stride *= 2

    def finish(self) -> None:
        """Build the histogram over [min(lo, 0), max(hi, 0)] from the kept values."""
        if not self.values:
            return
        self.edge_lo, self.edge_hi = min(self.lo, 0.0), max(self.hi, 0.0)
        width = (self.edge_hi - self.edge_lo) or 1.0
        flat = np.concatenate(self.values)
        idx = ((flat - self.edge_lo) * (BINS / width)).astype(np.int64)
        self.counts = np.bincount(np.clip(idx, 0, BINS - 1), minlength=BINS)
        self.values = []

    def centers(self) -> np.ndarray:
        width = (self.edge_hi - self.edge_lo) / BINS
        return self.edge_lo + width * (np.arange(BINS) + 0.5)


def clip_range(h: Histogram, method: str, levels: int, percentile: float = 99.999) -> tuple[float, float]:
    """(lo, hi) to quantize a tensor to ``levels`` steps; always contains 0 (zero must be exact)."""
    lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
    if method == "minmax" or h.counts is None or h.counts.sum() == 0 or hi - lo <= 0:
        return lo, hi
    if method == "percentile":
        return _percentile(h, percentile)
    if method == "entropy":
        return _entropy(h, levels)
    if method == "mse":
        return _mse(h, levels)
    raise ValueError(method)


def _percentile(h: Histogram, percentile: float) -> tuple[float, float]:
    cdf = np.cumsum(h.counts) / h.counts.sum()
    tail = 1.0 - percentile / 100.0
    centers = h.centers()
    lo = centers[min(np.searchsorted(cdf, tail), len(cdf) - 1)] if h.lo < 0 else 0.0
    hi = centers[min(np.searchsorted(cdf, 1.0 - tail), len(cdf) - 1)] if h.hi > 0 else 0.0
    return min(float(lo), 0.0), max(float(hi), 0.0)


def _candidates(h: Histogram, count: int = 64) -> list[tuple[float, float]]:
    """Shrinking clipping ranges, scaled around zero from the full range down to 2 % of it."""
    lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
    return [(lo * f, hi * f) for f in np.geomspace(1.0, 0.02, count)]


def _mse(h: Histogram, levels: int) -> tuple[float, float]:
    """The range minimizing E[(x - dequant(quant(x)))^2] under the histogram (clipping + rounding error).

    The two ends are searched one at a time (two rounds of coordinate descent), each over 128 shrink
    factors at once: an outlier on one side must not shrink the other side's range.
    """
    x, p = h.centers(), h.counts.astype(np.float64)
    lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
    shrink = np.geomspace(1.0, 0.01, 128)
    for _ in range(2):
        for side in ("hi", "lo"):
            if (hi if side == "hi" else -lo) <= 0:
                continue
            los = np.full_like(shrink, lo) if side == "hi" else lo * shrink
            his = hi * shrink if side == "hi" else np.full_like(shrink, hi)
            best = int(np.argmin(_mse_of(x, p, los, his, levels)))
            lo, hi = float(los[best]), float(his[best])
    return lo, hi


def _mse_of(x: np.ndarray, p: np.ndarray, los: np.ndarray, his: np.ndarray, levels: int) -> np.ndarray:
    """Expected squared error of quantizing the histogram with each (lo, hi) pair."""
    step = ((his - los) / (levels - 1))[:, None]
    q = np.clip(np.round((x[None, :] - los[:, None]) / step), 0, levels - 1) * step + los[:, None]
    return ((x[None, :] - q) ** 2) @ p + p.sum() * step[:, 0] ** 2 / 12


def _entropy(h: Histogram, levels: int) -> tuple[float, float]:
    """TensorRT-style calibration: the range whose quantized distribution has the least KL divergence."""
    p_all = h.counts.astype(np.float64)
    centers = h.centers()
    # Exact zeros (after Relu, padding) pile up in one bin that quantization keeps exact anyway; smeared
    # into its chunk it would dominate the divergence and push the range to clip everything else.
    p_all[np.argmin(np.abs(centers))] = 0.0
    best, best_kl = None, np.inf
    for lo, hi in _candidates(h):
        inside = (centers >= lo) & (centers <= hi)
        if inside.sum() < levels:  # fewer bins than quantization levels: KL is no longer meaningful
            break
        ref = p_all[inside].copy()
        ref[0] += p_all[centers < lo].sum()  # clipped mass lands on the edges
        ref[-1] += p_all[centers > hi].sum()
        inner = p_all[inside]
        starts = np.array([c[0] for c in np.array_split(np.arange(len(ref)), min(levels, len(ref)))])
        sums = np.add.reduceat(inner, starts)
        nonzero = np.add.reduceat((inner > 0).astype(np.float64), starts)
        chunk = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(ref))))
        cand = np.where(inner > 0, sums[chunk] / np.maximum(nonzero[chunk], 1), 0.0)
        kl = _kl(ref, cand)
        if kl < best_kl:
            best, best_kl = (lo, hi), kl
    return best if best is not None else (min(h.lo, 0.0), max(h.hi, 0.0))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / max(q.sum(), 1e-30)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
