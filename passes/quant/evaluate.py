"""Running candidates in onnxruntime as users will (all graph optimizations on, so QDQ groups become int8
kernels): outputs on calibration samples, the output error metrics, and interleaved latency."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from graphopt.errors import GraphoptError
from graphopt.timing import interleaved_ratios

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


def paired_latency(candidate: bytes, baseline: bytes | ort.InferenceSession, feed: Mapping[str, np.ndarray],
                   seconds: float = 2.0, min_runs: int = 5) -> tuple[float, dict[str, float]]:
    """(median of per-round candidate/baseline time ratios, median ms of each), see
    :func:`graphopt.timing.interleaved_ratios`.

    ``baseline`` may be a session made once by a caller that times several candidates against it (a
    GPT-2-base session takes seconds to create).
    """
    fp32 = baseline if isinstance(baseline, ort.InferenceSession) else session(baseline)
    ratios, ms = interleaved_ratios([fp32, session(candidate)], feed, seconds, min_runs)
    return ratios[1], {"quantized": ms[1], "fp32": ms[0]}
