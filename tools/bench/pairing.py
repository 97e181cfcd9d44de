"""Paired ratios of interleaved timings. Standard library only: the GPU side of ``tools/bench_tvm.py``
runs where neither onnx nor graphopt is installed."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def paired_ratio(samples_ms: Sequence[float], baseline_ms: Sequence[float]) -> float | None:
    """Median over rounds of ``sample / baseline`` measured in the same round of an interleaved run.

    More robust than a ratio of medians when the machine's speed drifts during the run: both timings of
    a round saw the same machine.
    """
    pairs = [a / b for a, b in zip(samples_ms, baseline_ms, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else None
