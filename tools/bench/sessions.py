"""onnxruntime CPU sessions for benchmarks, all made the same way.

Two intra-op threads (the benchmark machine has two cores), one inter-op thread, and
``session.intra_op.allow_spinning = "0"``: several sessions are alive at once while variants are
interleaved, and idle spinning threads of one session slowed another 7-13x in a measurement here.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .stats import external_files, file_bytes

LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: Above this size an offline-optimized model is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_ABOVE = 1_800_000_000


def session_options(level: str = "disable_all", *, threads: int = 2) -> ort.SessionOptions:
    """Options for a benchmark session at optimization ``level`` (a key of :data:`LEVELS`)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cpu_session(model: str | os.PathLike | bytes, level: str = "disable_all", *,
                threads: int = 2) -> ort.InferenceSession:
    """A CPU session; a path is passed as a path so external data resolves next to the model."""
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, session_options(level, threads=threads), providers=["CPUExecutionProvider"])


def save_optimized(src: str | os.PathLike, dst: str | os.PathLike, level: str = "basic", *,
                   external_data: bool | None = None) -> None:
    """Let onnxruntime optimize ``src`` at ``level`` and write the resulting graph to ``dst`` (offline mode).

    Only ``basic`` gives a portable model (standard ops only); higher levels may write onnxruntime's
    contrib ops. With ``external_data`` (default: when ``src`` has external data or is large; see
    :func:`needs_external_data`) weights go to a data file next to ``dst``: otherwise onnxruntime keeps
    pointing at the source's data file by a relative path that does not exist next to ``dst``.
    """
    so = session_options(level)
    so.optimized_model_filepath = os.fspath(dst)
    if external_data if external_data is not None else needs_external_data(src):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(dst).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(os.fspath(src), so, providers=["CPUExecutionProvider"])


def needs_external_data(src: str | os.PathLike) -> bool:
    """Whether a rewrite of ``src`` should be written with external data: it has some, or it is large."""
    source = onnx.load(os.fspath(src), load_external_data=False)
    return bool(external_files(source)) or file_bytes(src, source) > EXTERNAL_DATA_ABOVE


def run_outputs(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """All outputs by name; inputs the session does not take are dropped (a tool may remove unused ones)."""
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def creation_seconds(models: Mapping[str, str], levels: tuple[str, ...] | list[str] = ("basic", "all"),
                     repeat: int = 3, threads: int = 2) -> dict[str, dict[str, float | str]]:
    """Median wall time to create a session for every model (label -> path) at every level.

    Creations are interleaved (every model and level once per round) so drift spreads over all of them;
    each session is dropped before the next is made. Returns ``{label: {level: seconds or error text}}``.
    """
    times: dict[tuple[str, str], list[float]] = {(label, level): [] for label in models for level in levels}
    errors: dict[tuple[str, str], str] = {}
    for _ in range(repeat):
        for (label, level), samples in times.items():
            if (label, level) in errors:
                continue
            start = time.perf_counter()
            try:
                sess = cpu_session(models[label], level, threads=threads)
            except Exception as exc:  # noqa: BLE001 - a model onnxruntime rejects is a cell, not a stop
                errors[(label, level)] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            samples.append(time.perf_counter() - start)
            del sess
    out: dict[str, dict[str, float | str]] = {label: {} for label in models}
    for (label, level), samples in times.items():
        out[label][level] = errors.get((label, level)) or statistics.median(samples)
    return out
