"""Latency of several variants measured interleaved (A B C, B C A, ...), reported as medians.

Speed on a shared machine drifts (2.5x within one session here), so a variant measured after another
would inherit a different machine; interleaving run by run spreads the drift over all variants and
makes ratios taken from the same run meaningful. The passes that time their choices (quantization's latency
check, pruning's allocation) and the benchmarks in tools/ share this one loop.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


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


#: Calls per round are chosen so a variant's block of calls lasts about this long (at most MAX_BLOCK calls).
BLOCK_MS = 5.0
MAX_BLOCK = 20


def measure_interleaved(
    variants: Mapping[str, Callable[[], object]], *, runs: int = 20, warmup: int = 3, min_seconds: float = 0.0,
    max_runs: int = 1000, block_ms: float = BLOCK_MS,
) -> dict[str, LatencyStats]:
    """Call every variant ``warmup`` times, then ``runs`` rounds; in a round each variant runs a block of
    back-to-back calls, the order rotated by one each round (where a variant sat in a fixed order moved its
    paired ratio by up to 0.1 on 0.2 ms models).

    A round's sample is the median of a block's calls after the first: a model served in a loop runs warm,
    while the first call after six other models found the caches and thread pool cold (one call per round
    read int8 ResNet 1.11x against 1.30x back to back). A variant slower than ``block_ms`` runs one call per
    round, whose switch-in cost is small beside it; ``block_ms=0`` always does.

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
    blocks, round_s = {}, 0.0
    for name, call in live.items():
        call()  # blocks are sized by a warm call: the first after another variant carries its switch-in cost
        start = time.perf_counter()
        call()
        took = time.perf_counter() - start
        blocks[name] = 1 if took * 1e3 >= block_ms else min(MAX_BLOCK, 1 + int(block_ms / max(took * 1e3, 1e-6)))
        round_s += took * blocks[name]
    if min_seconds > 0 and live:
        runs = max(runs, min(max_runs, int(min_seconds / max(round_s, 1e-6))))
    for round_ in range(runs):
        if not live:
            break
        names = list(live)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            try:
                wall, cpu = _block(live[name], blocks[name])
            except Exception as exc:  # noqa: BLE001
                results[name].error = f"{type(exc).__name__}: {exc}"
                del live[name]
                continue
            results[name].samples_ms.append(wall)
            results[name].cpu_samples_ms.append(cpu)
    for stats in results.values():
        if stats.samples_ms and stats.error is None:
            stats.runs = len(stats.samples_ms)
            stats.median_ms = statistics.median(stats.samples_ms)
            stats.min_ms = min(stats.samples_ms)
            stats.cpu_median_ms = statistics.median(stats.cpu_samples_ms)
    return results


def raise_failures(stats: Mapping[str, LatencyStats]) -> None:
    """For measuring tools where every variant must run: raise the errors :func:`measure_interleaved` recorded."""
    failed = {name: st.error for name, st in stats.items() if st.error}
    if failed:
        raise RuntimeError(f"variants failed: {failed}")


def _block(call: Callable[[], object], count: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call: the median over ``count`` back-to-back calls, the first of
    them untimed when there are more."""
    walls, cpus = [], []
    for i in range(count):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        if i or count == 1:
            walls.append((time.perf_counter() - start) * 1e3)
            cpus.append((time.process_time() - cpu_start) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def interleaved_ratios(sessions: Sequence[Any], feed: Mapping[str, Any], seconds: float = 2.0, min_rounds: int = 5,
                       max_rounds: int = 2000, warmup: int = 2,
                       round_ms: float = 1.0) -> tuple[list[float], list[float]]:
    """(each session's median over rounds of its time / the first session's, each one's median ms), for the
    passes that decide by timing onnxruntime sessions (anything with ``run(None, feed)``); a failing run raises.

    A ratio per round, not a ratio of medians: on a shared machine the load drifts within a second, and each
    round sees the same load for every model. Rounds go on for about ``seconds`` (``min_rounds`` to
    ``max_rounds``), each session's block lasting about ``round_ms``: one run of a 30 us model is mostly timer
    and thread wake-up jitter, and 2000 single-run rounds of the digits CNN lasted 0.1 s, so the quantizer's
    verdict on it flipped between runs (0.83x to 1.03x fp32's time).
    """
    calls = {str(i): functools.partial(sess.run, None, dict(feed)) for i, sess in enumerate(sessions)}
    stats = measure_interleaved(calls, runs=min_rounds, warmup=warmup, min_seconds=seconds, max_runs=max_rounds,
                                block_ms=round_ms)
    raise_failures(stats)
    base = stats["0"].samples_ms
    ratios = [statistics.median(a / b for a, b in zip(st.samples_ms, base, strict=True)) for st in stats.values()]
    return ratios, [st.median_ms for st in stats.values()]
