"""On-disk cache of built models: content-addressed directories, published atomically under a file lock.

Layout: ``<cache>/<name>-<key>/<name>.onnx`` (+ ``<name>.onnx.data`` for external data) and
``<name>.json`` (the sidecar). A model is built into a temporary directory next to its final place and
renamed into place in one ``os.replace``, so readers never see a half-written model, and a per-model
``fcntl.flock`` makes concurrent builders (pytest-xdist workers) wait for each other instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

#: Bump to invalidate every cached model (e.g. when a builder changes in a way the config does not show).
ZOO_VERSION = "1"
_KEY_PACKAGES = ("torch", "onnx", "transformers", "scikit-learn", "skl2onnx", "onnxscript")


def cache_root() -> Path:
    """``$GRAPHOPT_ZOO_CACHE`` or ``<repo>/.cache/zoo`` (the repo is two levels above this package)."""
    env = os.environ.get("GRAPHOPT_ZOO_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "zoo"


@functools.cache
def package_versions() -> dict[str, str]:
    """Versions of the libraries whose output the models depend on (a new exporter makes a new graph)."""
    versions = {}
    for pkg in _KEY_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "missing"
    return versions


def cache_key(name: str, config: Mapping[str, Any]) -> str:
    """Short stable hash of everything that determines a model's content."""
    blob = json.dumps(
        {"zoo": ZOO_VERSION, "name": name, "config": config, "versions": package_versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_dir(name: str, config: Mapping[str, Any], root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{name}-{cache_key(name, config)}"


def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".json")


@contextlib.contextmanager
def model_lock(root: Path, name: str) -> Iterator[None]:
    """Exclusive per-model lock; blocks while another process builds the same model."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Temporary directory beside ``final``, renamed onto it on success and deleted on failure.

    Being on the same filesystem makes the rename atomic. The caller holds the model lock, so the only
    thing that can already sit at ``final`` is a stale build being forced out.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache entry should not be
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def graph_stats(onnx_path: Path) -> dict[str, Any]:
    """Node, parameter and op counts of a saved model, without loading external weight data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops: Counter[str] = Counter()
    total = _count_nodes(model.graph, ops)
    params = sum(_numel(init.dims) for init in model.graph.initializer)
    files = [p for p in onnx_path.parent.iterdir() if p.name.startswith(onnx_path.name)]
    return {
        "nodes": len(model.graph.node),
        "nodes_total": total,
        "params": params,
        "file_bytes": sum(p.stat().st_size for p in files),
        "files": sorted(p.name for p in files),
        "op_types": dict(sorted(ops.items())),
        "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "ir_version": model.ir_version,
    }


def _numel(dims: Any) -> int:
    count = 1
    for dim in dims:
        count *= int(dim)
    return count


def _count_nodes(graph: Any, ops: Counter[str]) -> int:
    """Count nodes recursively, including If/Loop/Scan bodies, tallying ``domain::op`` types."""
    import onnx

    total = 0
    for node in graph.node:
        total += 1
        ops[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _count_nodes(attr.g, ops)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(_count_nodes(g, ops) for g in attr.graphs)
    return total
