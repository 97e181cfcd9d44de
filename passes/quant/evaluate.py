"""Running candidates in onnxruntime as users will (all graph optimizations on, so QDQ groups become int8
kernels): outputs on calibration samples, the output error metrics, and interleaved latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from graphopt.errors import GraphoptError

Outputs = list[dict[str, np.ndarray]]


def session(model: bytes, threads: int = 2, label: str = "model") -> ort.InferenceSession:
    """A session as users run the model; a model onnxruntime rejects (an op it lacks) is the user's error."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several kinds; one message for the user
        raise GraphoptError(f"onnxruntime cannot load the {label}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_outputs(model: bytes | ort.InferenceSession, feeds: Sequence[Mapping[str, np.ndarray]],
                label: str = "quantized model", hint: str | None = "this is a graphopt bug; nothing was written"
                ) -> Outputs:
    sess = model if isinstance(model, ort.InferenceSession) else session(model, label=label)
    try:
        names = [o.name for o in sess.get_outputs()]
        return [dict(zip(names, sess.run(names, dict(feed)), strict=True)) for feed in feeds]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several kinds; one message for the user
        raise GraphoptError(f"onnxruntime cannot run the {label}: {_first_line(exc)}", hint=hint) from exc


def output_errors(ref: Outputs, got: Outputs) -> dict[str, float]:
    """cosine: mean over samples of the cosine similarity of all float outputs (flattened together);
    rel_l2: ||ref - got|| / ||ref|| over everything; sqnr_db: 10 log10(signal / noise)."""
    cosines, signal, noise = [], 0.0, 0.0
    for r, g in zip(ref, got, strict=True):
        a, b = _float_values(r, r), _float_values(g, r)
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cosines.append(float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b)))
        signal += float(a @ a)
        noise += float((a - b) @ (a - b))
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = 10 * math.log10(signal / noise) if noise > 0 else math.inf
    return {"cosine": float(np.mean(cosines)), "rel_l2": rel, "sqnr_db": sqnr}


def _float_values(outputs: Mapping[str, object], ref: Mapping[str, object]) -> np.ndarray:
    """The float outputs (those that are float in ``ref``) flattened into one vector; a ZipMap's sequence of
    {label: probability} maps counts as its probabilities. Integer and string outputs are not compared."""
    parts = []
    for name, value in ref.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            parts.append(np.ravel(outputs[name]))
        elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            parts.append(np.array([[m[k] for k in sorted(m)] for m in outputs[name]]).ravel())
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def metric_value(errors: Mapping[str, float], metric: str) -> float:
    """The budget metric as an error (lower is better)."""
    return 1.0 - errors["cosine"] if metric == "cosine" else errors["rel_l2"]


def interleaved_ratios(sessions: Sequence[ort.InferenceSession], feed: Mapping[str, np.ndarray],
                       seconds: float = 2.0, min_rounds: int = 5, max_rounds: int = 2000,
                       warmup: int = 2, round_ms: float = 1.0) -> tuple[list[float], list[float]]:
    """(each session's median over rounds of its time / the first session's, each one's median ms).

    A ratio per round, not a ratio of medians: on a shared machine the load drifts within a second,
    and each round sees the same load for every model. The order rotates each round so no model
    always runs right after the same one. In a round each model runs enough times in a row for the fastest
    to take ``round_ms`` (and warms up as many times over): one run of a 30 us model is mostly timer and
    thread wake-up jitter, and 2000 single-run rounds of the digits CNN lasted 0.1 s, so the quantizer's
    verdict on it flipped between runs (0.83x to 1.03x fp32's time).
    """
    fastest = math.inf
    for sess in sessions:
        for _ in range(warmup):
            t = time.perf_counter()
            sess.run(None, dict(feed))
            fastest = min(fastest, (time.perf_counter() - t) * 1000)
    reps = max(1, math.ceil(round_ms / max(fastest, 1e-6)))
    if reps > 1:
        for sess in sessions:
            for _ in range(warmup * reps):
                sess.run(None, dict(feed))
    times: list[list[float]] = [[] for _ in sessions]
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < seconds):
        for k in range(len(sessions)):
            i = (k + rounds) % len(sessions)
            t = time.perf_counter()
            for _ in range(reps):
                sessions[i].run(None, dict(feed))
            times[i].append((time.perf_counter() - t) * 1000 / reps)
        rounds += 1
    ratios = [statistics.median(a / b for a, b in zip(ts, times[0], strict=True)) for ts in times]
    return ratios, [statistics.median(ts) for ts in times]


def paired_latency(candidate: bytes, baseline: bytes | ort.InferenceSession, feed: Mapping[str, np.ndarray],
                   seconds: float = 2.0, min_runs: int = 5) -> tuple[float, dict[str, float]]:
    """(median of per-round candidate/baseline time ratios, median ms of each), see :func:`interleaved_ratios`.

    ``baseline`` may be a session made once by a caller that times several candidates against it (a
    GPT-2-base session takes seconds to create).
    """
    fp32 = baseline if isinstance(baseline, ort.InferenceSession) else session(baseline)
    ratios, ms = interleaved_ratios([fp32, session(candidate)], feed, seconds, min_runs)
    return ratios[1], {"quantized": ms[1], "fp32": ms[0]}
