"""Does a tool's output model compute what the original computes? Reference outputs and comparisons.

The reference is the original model in onnxruntime with ``ORT_DISABLE_ALL`` (the graph as written), run
once per input set and pickled, so each candidate is then checked in its own short process (a candidate
that crashes onnxruntime costs only its own row). Verdicts use graphopt's dtype-aware tolerance
(:mod:`graphopt.verify.compare`): exact for integers, rtol/atol plus a float-noise rule for floats.
Outputs that are sequences of maps (scikit-learn's ZipMap) are compared as arrays of their values.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from .child import ChildResult, run_in_child
from .sessions import cpu_session, run_outputs

#: Names of input sets in a feeds file: the model's default shape and, for dynamic models, another one.
PRIMARY, SECOND = "primary", "second"


def normalize(value: Any) -> Any:
    """Arrays stay arrays; a list of dicts (ZipMap) becomes a 2-D array of values in key order."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value])
    return value


def reference_outputs(model: str, feeds_file: str, out_file: str) -> dict[str, Any]:
    """Run the original on every input set in ``feeds_file`` and pickle ``{set: {output: value}}``."""
    with open(feeds_file, "rb") as f:
        feed_sets: dict[str, dict[str, np.ndarray]] = pickle.load(f)
    sess = cpu_session(model)
    outputs = {name: run_outputs(sess, feeds) for name, feeds in feed_sets.items()}
    with open(out_file, "wb") as f:
        pickle.dump(outputs, f)
    return {name: sorted(values) for name, values in outputs.items()}


def check_candidate(model: str, feeds_file: str, reference_file: str) -> dict[str, dict[str, Any]]:
    """Compare ``model`` with the pickled reference on every input set.

    Returns ``{set: {"ok", "max_abs", "verdicts", "error"}}``; ``max_abs`` is the largest absolute
    difference over all outputs (``inf`` where a shape or a non-finite position differs).
    """
    from graphopt.verify.compare import compare_values

    with open(feeds_file, "rb") as f:
        feed_sets = pickle.load(f)
    with open(reference_file, "rb") as f:
        reference = pickle.load(f)
    try:
        sess = cpu_session(model)
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime rejects fails every input set
        message = f"onnxruntime cannot load it: {_first_line(exc)}"
        return {name: {"ok": False, "max_abs": None, "verdicts": {}, "error": message} for name in feed_sets}
    results = {}
    for name, feeds in feed_sets.items():
        try:
            got = run_outputs(sess, feeds)
        except Exception as exc:  # noqa: BLE001 - e.g. a shape baked in by the tool, seen at the second shape
            results[name] = {"ok": False, "max_abs": None, "verdicts": {}, "error": f"run: {_first_line(exc)}"}
            continue
        diffs = [compare_values(out, normalize(ref), normalize(got.get(out))) for out, ref in reference[name].items()]
        results[name] = {
            "ok": all(d.ok for d in diffs),
            "max_abs": _worst_abs(diffs),
            "verdicts": {d.name: d.verdict for d in diffs},
            "error": "; ".join(f"{d.name}: {d.verdict} {d.detail}".strip() for d in diffs if not d.ok)[:300] or None,
        }
    return results


def check_in_children(src: str, candidates: Mapping[str, str], feeds_file: str, reference_file: str,
                      timeout: float) -> tuple[ChildResult, dict[str, ChildResult]]:
    """The original's reference outputs in one child process, then each candidate (label -> path) checked in
    its own (a candidate that crashes onnxruntime costs only its own row). Nothing is checked when the
    reference run fails."""
    ref = run_in_child("tools.bench.numerics:reference_outputs",
                       {"model": src, "feeds_file": feeds_file, "out_file": reference_file},
                       timeout=timeout, preload=("onnxruntime", "numpy"))
    if not ref.ok:
        return ref, {}
    return ref, {label: run_in_child("tools.bench.numerics:check_candidate",
                                     {"model": path, "feeds_file": feeds_file, "reference_file": reference_file},
                                     timeout=timeout, preload=("onnxruntime", "graphopt.verify"))
                 for label, path in candidates.items()}


def _worst_abs(diffs: list[Any]) -> float | None:
    if any(d.verdict in ("shape_mismatch", "missing") for d in diffs):
        return math.inf
    values = [d.max_abs for d in diffs if d.max_abs is not None]
    return max(values) if values else 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def write_feeds(path: str, feed_sets: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Pickle input sets for :func:`reference_outputs` / :func:`check_candidate` running in a child."""
    with open(path, "wb") as f:
        pickle.dump({k: dict(v) for k, v in feed_sets.items()}, f)
