"""Latency of several variants measured interleaved (A B C A B C ...), reported as medians.

Speed on a shared machine drifts (2.5x within one session here), so a variant measured after another
would inherit a different machine; interleaving run by run spreads the drift over all variants and
makes ratios taken from the same run meaningful.
"""

from __future__ import annotations

import logging
import pickle
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .sessions import cpu_session

log = logging.getLogger(__name__)


@dataclass
class LatencyStats:
    """Per-variant timings in milliseconds; ``error`` is set (and the rest empty) when a run failed.

    ``cpu_*``: CPU time of the whole process (all onnxruntime threads) per call, which other processes on a
    shared machine stretch much less than wall time.
    """

    median_ms: float | None = None
    min_ms: float | None = None
    cpu_median_ms: float | None = None
    runs: int = 0
    samples_ms: list[float] = field(default_factory=list)
    cpu_samples_ms: list[float] = field(default_factory=list)
    error: str | None = None

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not samples:
            data.pop("samples_ms")
            data.pop("cpu_samples_ms")
        return data


def measure_interleaved(
    variants: Mapping[str, Callable[[], object]], *, runs: int = 20, warmup: int = 3, min_seconds: float = 0.0,
    max_runs: int = 1000,
) -> dict[str, LatencyStats]:
    """Call every variant ``warmup`` times, then ``runs`` rounds of one call each, the order rotated by one
    each round (where a variant sits in the round moved its paired ratio by up to 0.1 on 0.2 ms models).

    With ``min_seconds``, fast variants get more rounds (up to ``max_runs``) so the rounds take about that
    long: 20 rounds of a sub-millisecond model measure mostly the machine's noise.
    A variant that raises is dropped from later rounds and reports its error; the others go on.
    """
    results = {name: LatencyStats() for name in variants}
    live = dict(variants)
    for name, call in list(live.items()):
        try:
            for _ in range(warmup):
                call()
        except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the others
            results[name].error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            del live[name]
    if min_seconds > 0 and live:
        start = time.perf_counter()
        for call in live.values():
            call()
        runs = max(runs, min(max_runs, int(min_seconds / max(time.perf_counter() - start, 1e-6))))
    for round_ in range(runs):
        if not live:
            break
        names = list(live)  # rotated each round: no variant always runs first, or right after the same one
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            call = live[name]
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                results[name].error = f"{type(exc).__name__}: {exc}"
                del live[name]
                continue
            results[name].samples_ms.append((time.perf_counter() - start) * 1e3)
            results[name].cpu_samples_ms.append((time.process_time() - cpu_start) * 1e3)
    for stats in results.values():
        if stats.samples_ms and stats.error is None:
            stats.runs = len(stats.samples_ms)
            stats.median_ms = statistics.median(stats.samples_ms)
            stats.min_ms = min(stats.samples_ms)
            stats.cpu_median_ms = statistics.median(stats.cpu_samples_ms)
    return results


def ort_latency(
    models: Mapping[str, str],
    feeds_file: str,
    levels: Sequence[str] = ("disable_all", "all"),
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
    samples: bool = False,
    min_seconds: float = 0.0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Latency of every model (label -> path) at every onnxruntime level, all interleaved in one process.

    ``feeds_file`` is a pickle of an input dict (run in a :mod:`.child`, it must be a path). Returns
    ``{label: {level: LatencyStats dict}}``; a model onnxruntime cannot load gets the error at every level.
    With ``samples`` the per-round timings are kept too (see :func:`.pairing.paired_ratio`); ``min_seconds``: see
    :func:`measure_interleaved`.
    """
    with open(feeds_file, "rb") as f:
        feeds = pickle.load(f)
    variants: dict[str, Callable[[], object]] = {}
    errors: dict[str, str] = {}
    for label, path in models.items():
        for level in levels:
            key = f"{label}\t{level}"
            try:
                sess = cpu_session(path, level, threads=threads)
            except Exception as exc:  # noqa: BLE001
                errors[key] = f"session: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                continue
            wanted = {i.name for i in sess.get_inputs()}
            variants[key] = _runner(sess, {k: v for k, v in feeds.items() if k in wanted})
    measured = measure_interleaved(variants, runs=runs, warmup=warmup, min_seconds=min_seconds)
    out: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in models}
    for key, error in errors.items():
        label, level = key.split("\t")
        out[label][level] = LatencyStats(error=error).to_dict()
    for key, stats in measured.items():
        label, level = key.split("\t")
        out[label][level] = stats.to_dict(samples=samples)
    return out


def _runner(sess: Any, feeds: dict[str, Any]) -> Callable[[], object]:
    def call() -> object:
        return sess.run(None, feeds)

    return call
