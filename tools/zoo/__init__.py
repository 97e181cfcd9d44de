"""graphopt's model zoo: ONNX models built locally and deterministically, cached under ``.cache/zoo``.

    from tools.zoo import MODELS, build, info, load_data, make_inputs
    path = build("resnet_dynamo")      # builds once (seconds), then returns the cached path
    feeds = make_inputs(MODELS["resnet_dynamo"], second=True)   # valid inputs at another shape

Every model is checked at build time (onnxruntime vs torch, scikit-learn or a numpy reference), so a
cached file is known to be right. Full-size models (``full_size=True``) are built only when asked for
by name or with ``python -m tools.zoo --full``. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .cache import (
    ZOO_VERSION,
    cache_root,
    graph_stats,
    model_dir,
    model_lock,
    package_versions,
    read_json,
    sidecar_path,
    staging_dir,
    write_json,
)
from .registry import MODELS
from .spec import InputSpec, ZooModel, make_inputs

__all__ = [
    "MODELS",
    "ZOO_VERSION",
    "InputSpec",
    "ZooModel",
    "ZooSkipError",
    "build",
    "cache_root",
    "get",
    "info",
    "onnx_path",
    "is_built",
    "load_data",
    "make_inputs",
    "small_models",
]

log = logging.getLogger(__name__)


class ZooSkipError(RuntimeError):
    """The model cannot be built with the installed libraries; the message says why."""


def get(name: str) -> ZooModel:
    """Model metadata by name, with the list of known names on a typo."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def small_models() -> list[str]:
    """Names of the default (not full-size) set, in registry order."""
    return [m.name for m in MODELS.values() if not m.full_size]


def onnx_path(name: str) -> Path:
    """Where ``build(name)`` puts the model (whether or not it is built yet)."""
    model = get(name)
    return model_dir(name, model.config) / f"{name}.onnx"


def is_built(name: str) -> bool:
    """True when the cache holds a complete build for the current config and library versions."""
    return sidecar_path(onnx_path(name)).is_file()


def build(name: str, *, force: bool = False) -> Path:
    """Path of the model's ``.onnx`` file, building and verifying it first unless already cached.

    Safe to call from several processes at once: one builds while the others wait on a file lock, and
    the result appears atomically. ``force=True`` rebuilds even when cached.
    """
    model = get(name)
    if model.skip_reason:
        raise ZooSkipError(f"zoo model {name} cannot be built: {model.skip_reason}")
    path = onnx_path(name)
    if is_built(name) and not force:
        return path
    with model_lock(path.parent.parent, name):
        if is_built(name) and not force:  # another process finished it while we waited
            return path
        _build_into(model, path)
    return path


def _build_into(model: ZooModel, path: Path) -> None:
    log.info("zoo: building %s (%s exporter)", model.name, model.exporter)
    start = time.perf_counter()
    with staging_dir(path.parent) as tmp:
        staged = tmp / path.name
        extras = model.builder(model, staged)
        seconds = time.perf_counter() - start
        meta = {
            "name": model.name,
            "family": model.family,
            "exporter": model.exporter,
            "full_size": model.full_size,
            "zoo_version": ZOO_VERSION,
            "config": model.config,
            "versions": package_versions(),
            "build_seconds": round(seconds, 3),
            **graph_stats(staged),
            **extras,
        }
        write_json(sidecar_path(staged), meta)  # written last: its presence marks a complete build
    log.info("zoo: built %s in %.1f s (%d nodes)", model.name, seconds, meta["nodes"])


def info(name: str) -> dict[str, Any]:
    """The sidecar metadata of a model (node/param counts, build time, accuracy...), building it if needed."""
    return read_json(sidecar_path(build(name)))


def load_data(name: str) -> dict[str, Any]:
    """Real held-out data for a model, family or dataset name.

    ``digits_cnn_*``: ``images`` (N, 1, 8, 8) float32 in [0, 1] and ``labels``; ``minilm_*``: ``sentences``
    plus ``input_ids`` / ``attention_mask`` from MiniLM's tokenizer; ``sklearn_*``: ``X`` and ``labels``.
    """
    from .data import load_dataset

    by_family = {m.family: m.dataset for m in MODELS.values() if m.dataset}
    dataset = MODELS[name].dataset if name in MODELS else by_family.get(name, name)
    if dataset is None:
        raise KeyError(f"zoo model {name} has no real data (random inputs from make_inputs only)")
    return load_dataset(dataset)
