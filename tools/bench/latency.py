"""onnxruntime latency of model files at several optimization levels, all interleaved in one process
(:func:`graphopt.timing.measure_interleaved`)."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from graphopt.timing import LatencyStats, measure_interleaved

from .sessions import cpu_session


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
