"""Dtype-aware comparison of a reference value with a candidate value.

Each value gets one verdict: ``match``, ``float_noise`` (both count as ok),
``mismatch``, ``shape_mismatch`` or ``missing``. The rule for floats is
described in :mod:`graphopt.verify`; integers, bools and strings must be equal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

logger = logging.getLogger(__name__)

OK_VERDICTS = ("match", "float_noise")
VERDICTS = ("match", "float_noise", "mismatch", "shape_mismatch", "missing")

# Elementwise (rtol, atol) per float dtype: what a careful kernel change may move a value by.
_ELEMENTWISE = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (2e-2, 1e-2),
}
# Noise bound per float dtype, in units of the dtype's eps (see the package docstring for why).
_NOISE_EPS = {"float64": 2**12, "float32": 2**10, "float16": 2**5, "bfloat16": 2**3}
_NOISE_EPS_OTHER = 2  # float8 and friends: two ulps of the output's scale


@dataclass(frozen=True)
class Tolerance:
    """How far a float value may move.

    ``rtol``/``atol`` bound each element (``|got - ref| <= atol + rtol * |ref|``);
    ``noise`` bounds every element's error as a multiple of the reference
    tensor's RMS, which is how float rounding noise scales. ``noise=0`` turns the
    noise rule off. All zeros means exact comparison.
    """

    rtol: float
    atol: float
    noise: float = 0.0


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes ones (bfloat16, float8)."""
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def default_tolerance(dtype: np.dtype) -> Tolerance:
    """The default tolerance for values of ``dtype``: exact for non-floats."""
    dtype = np.dtype(dtype)
    if not is_float_dtype(dtype):
        return Tolerance(0.0, 0.0, 0.0)
    eps = float(ml_dtypes.finfo(dtype).eps)
    rtol, atol = _ELEMENTWISE.get(dtype.name, (2 * eps, eps))
    return Tolerance(rtol, atol, _NOISE_EPS.get(dtype.name, _NOISE_EPS_OTHER) * eps)


def tolerance_for(
    dtype: np.dtype, rtol: float | None = None, atol: float | None = None, noise: float | None = None
) -> Tolerance:
    """The default tolerance for ``dtype`` with any explicitly given part replacing the default."""
    base = default_tolerance(dtype)
    if not is_float_dtype(np.dtype(dtype)):
        return base
    return Tolerance(
        base.rtol if rtol is None else rtol,
        base.atol if atol is None else atol,
        base.noise if noise is None else noise,
    )


@dataclass
class OutputDiff:
    """The comparison of one named value (a graph output, or an intermediate during bisection).

    ``max_abs``/``max_rel`` are over finite elements (``max_rel`` is inf where
    the reference is 0 and the candidate is not); ``scaled_error`` is
    ``max_abs / ref_rms``, the number the noise rule bounds; ``mismatched``
    counts elements outside rtol/atol (or unequal, for exact dtypes).
    """

    name: str
    verdict: str
    dtype: str | None = None
    shape: list[int] | None = None
    got_dtype: str | None = None
    got_shape: list[int] | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    ref_rms: float | None = None
    scaled_error: float | None = None
    mismatched: int = 0
    num_elements: int = 0
    tolerance_used: Tolerance | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the verdict counts as numerically equivalent."""
        return self.verdict in OK_VERDICTS


def compare_values(
    name: str,
    ref: Any,
    got: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    noise: float | None = None,
    computed_in: np.dtype | None = None,
) -> OutputDiff:
    """Compare one reference value with the candidate's (``None`` if the candidate lacks it).

    ``computed_in``: a narrower float type the value was computed through (:mod:`.precision`), whose
    default tolerance then applies to it.
    """
    if got is None:
        return OutputDiff(name, "missing", detail="the candidate produces no value of this name")
    if isinstance(ref, list) or isinstance(got, list):
        return _compare_sequences(name, ref, got, rtol=rtol, atol=atol, noise=noise)
    ref, got = np.asarray(ref), np.asarray(got)
    diff = OutputDiff(
        name,
        "match",
        dtype=ref.dtype.name,
        shape=list(ref.shape),
        got_dtype=got.dtype.name,
        got_shape=list(got.shape),
        num_elements=int(ref.size),
    )
    if ref.shape != got.shape:
        diff.verdict, diff.detail = "shape_mismatch", f"shape {list(got.shape)}, expected {list(ref.shape)}"
    elif ref.dtype != got.dtype:
        diff.verdict, diff.detail = "mismatch", f"dtype {got.dtype.name}, expected {ref.dtype.name}"
    elif is_float_dtype(ref.dtype):
        looser = computed_in is not None and ml_dtypes.finfo(computed_in).eps > ml_dtypes.finfo(ref.dtype).eps
        diff.tolerance_used = tolerance_for(computed_in if looser else ref.dtype, rtol, atol, noise)
        if looser:
            diff.detail = f"judged as {np.dtype(computed_in).name}, which its computation passes through"
        _compare_floats(diff, ref, got, diff.tolerance_used)
    else:
        diff.tolerance_used = default_tolerance(ref.dtype)
        _compare_exact(diff, ref, got)
    return diff


def _compare_exact(diff: OutputDiff, ref: np.ndarray, got: np.ndarray) -> None:
    differs = np.asarray(ref != got)
    diff.mismatched = int(np.count_nonzero(differs))
    if ref.dtype.kind in "iub":
        err = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        diff.max_abs, diff.max_rel = _max(err), _max(_relative(err, np.abs(ref.astype(np.float64))))
    if diff.mismatched:
        diff.verdict = "mismatch"
        diff.detail = f"{diff.mismatched}/{ref.size} elements differ ({ref.dtype.name} is compared exactly)"


def _compare_floats(diff: OutputDiff, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> None:
    r, g = ref.astype(np.float64), got.astype(np.float64)
    r_fin, g_fin = np.isfinite(r), np.isfinite(g)
    same_special = (r == g) | (np.isnan(r) & np.isnan(g))
    special_bad = (r_fin != g_fin) | (~r_fin & ~g_fin & ~same_special)
    both = r_fin & g_fin
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(both, np.abs(g - r), 0.0)
    abs_r = np.where(r_fin, np.abs(r), 0.0)
    outside = err > tol.atol + tol.rtol * abs_r
    rms = math.sqrt(float(np.mean(np.square(r[r_fin])))) if r_fin.any() else 0.0
    diff.max_abs, diff.max_rel, diff.ref_rms = _max(err), _max(_relative(err, abs_r)), rms
    diff.scaled_error = diff.max_abs / rms if rms > 0 else (math.inf if diff.max_abs else 0.0)
    diff.mismatched = int(np.count_nonzero(outside) + np.count_nonzero(special_bad))
    if special_bad.any():
        diff.verdict = "mismatch"
        diff.detail = f"NaN/Inf differ at {int(np.count_nonzero(special_bad))} elements"
    elif not outside.any():
        diff.verdict = "match"
    elif tol.noise > 0 and _max(err[outside]) <= tol.noise * rms:
        diff.verdict = "float_noise"
        diff.detail = (
            f"{diff.mismatched}/{ref.size} elements outside rtol/atol, but every error is within "
            f"{tol.noise:.3g} x the output RMS ({rms:.3g}): float rounding noise"
        )
    else:
        diff.verdict = "mismatch"
        diff.detail = (
            f"{diff.mismatched}/{ref.size} elements outside rtol/atol; the largest error is "
            f"{diff.scaled_error:.3g} x the output RMS ({rms:.3g}), the noise bound {tol.noise:.3g}"
        )


def _relative(err: np.ndarray, abs_ref: np.ndarray) -> np.ndarray:
    """err / |ref|, inf where the reference is 0 and the error is not."""
    fallback = np.where(err > 0, np.inf, 0.0)
    return np.divide(err, abs_ref, out=fallback, where=abs_ref > 0)


def _max(values: np.ndarray) -> float:
    return float(np.max(values)) if values.size else 0.0


def _compare_sequences(name: str, ref: Any, got: Any, **tolerance: float | None) -> OutputDiff:
    if not (isinstance(ref, list) and isinstance(got, list)):
        return OutputDiff(name, "mismatch", detail="one value is a sequence, the other is not")
    if len(ref) != len(got):
        return OutputDiff(name, "shape_mismatch", detail=f"sequence of {len(got)} items, expected {len(ref)}")
    pairs = enumerate(zip(ref, got, strict=True))
    items = [compare_values(f"{name}[{i}]", r, g, **tolerance) for i, (r, g) in pairs]
    worst = max(items, key=lambda d: VERDICTS.index(d.verdict), default=OutputDiff(name, "match"))
    if worst.verdict == "match":
        return OutputDiff(name, "match", detail=f"sequence of {len(ref)} items")
    return OutputDiff(
        name,
        worst.verdict,
        max_abs=worst.max_abs,
        max_rel=worst.max_rel,
        detail=f"item {worst.name}: {worst.detail}",
    )


def compare_outputs(
    ref: Mapping[str, Any],
    got: Mapping[str, Any],
    rtol: float | None = None,
    atol: float | None = None,
    *,
    noise: float | None = None,
    computed_in: Mapping[str, np.dtype] | None = None,
) -> list[OutputDiff]:
    """Compare every reference output with the candidate output of the same name.

    Matching is by name: passes must keep graph output names. A reference
    output the candidate lacks gets the ``missing`` verdict; extra candidate
    outputs are ignored. Explicit ``rtol``/``atol`` replace the dtype defaults
    for the elementwise check; ``noise`` (0 disables) the float-noise bound;
    ``computed_in`` gives outputs computed through a narrower float type
    (:func:`graphopt.verify.precision.computed_in`) that type's defaults.
    """
    extra = sorted(set(got) - set(ref))
    if extra:
        logger.debug("candidate outputs not in the reference are not compared: %s", extra)
    return [
        compare_values(name, value, got.get(name), rtol=rtol, atol=atol, noise=noise,
                       computed_in=(computed_in or {}).get(name))
        for name, value in ref.items()
    ]
