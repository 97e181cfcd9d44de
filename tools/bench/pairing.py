"""Paired ratios of interleaved timings. Standard library only: the GPU side of ``tools/bench_tvm.py``
runs where neither onnx nor graphopt is installed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# Ratios this close count as equal even when the A/A control happens to read 1.000: identical models timed
# in one run read 0.991-1.01 here, so a strict 1.000 vs 0.997 is a coin toss, not a loss.
NOISE_FLOOR = 0.01


def paired_ratio(samples_ms: Sequence[float], baseline_ms: Sequence[float]) -> float | None:
    """Median over rounds of ``sample / baseline`` measured in the same round of an interleaved run.

    More robust than a ratio of medians when the machine's speed drifts during the run: both timings of
    a round saw the same machine.
    """
    pairs = [a / b for a, b in zip(samples_ms, baseline_ms, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else None


def run_noise(control: float | None) -> float:
    """A run's timing noise: its A/A control's (a model timed against itself) distance from 1, in either
    direction, at least :data:`NOISE_FLOOR`."""
    return max(abs(control - 1.0) if control is not None else 0.0, NOISE_FLOOR)
