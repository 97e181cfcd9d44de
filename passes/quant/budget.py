"""Accuracy budget: keep the most sensitive layers in float until the output error is within budget.

Sensitivity is measured by *removing one layer at a time from the fully quantized model* (each variant
run on a subset of the calibration data), not by quantizing one layer at a time into the fp32 model:
it costs the same number of runs, but it measures each layer's share of the error in the model that is
actually shipped (errors of neighbouring layers compound; alone, most layers look harmless), and the
search that follows starts from exactly those variants. Layers are then restored to float in order of
sensitivity; the smallest count that meets the budget on all calibration samples is found by bisection
(log2(layers) more runs), and checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

ErrorOf = Callable[[set[str], bool], float]  # (layers kept float, on the full data?) -> error


def sensitivities(layers: Sequence[str], error_of: ErrorOf, advance: Callable[[], None] = lambda: None
                  ) -> tuple[float, dict[str, float]]:
    """(error of the fully quantized model, {layer: error reduction when that layer alone stays float})."""
    base = error_of(set(), False)
    gains = {}
    for layer in layers:
        gains[layer] = base - error_of({layer}, False)
        advance()
    return base, gains


def fit_budget(order: Sequence[str], budget: float, error_of: ErrorOf) -> tuple[set[str], float, bool]:
    """The fewest layers of ``order`` (most sensitive first) to keep float so the full-data error <= budget.

    Returns (layers kept float, error, whether the budget is met). Bisection assumes the error falls as
    layers return to float; the answer is always measured, never assumed.
    """
    lo, hi = 0, len(order)  # invariant: keeping order[:hi] meets the budget (all-float does, trivially)
    hi_error = 0.0
    errors = {}
    while lo < hi:
        mid = (lo + hi) // 2
        errors[mid] = error_of(set(order[:mid]), True)
        log.info("budget: %d layers float -> error %.3g", mid, errors[mid])
        if errors[mid] <= budget:
            hi, hi_error = mid, errors[mid]
        else:
            lo = mid + 1
    if hi == len(order):
        hi_error = error_of(set(order), True)
    return set(order[:hi]), hi_error, hi_error <= budget
