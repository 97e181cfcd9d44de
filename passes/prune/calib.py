"""Calibration data: loading, checking against the model's inputs, batching, and activation statistics.

Three forms are accepted, because that is how people have their samples:

* an ``.npz`` of stacked samples: one array per input, with a leading sample
  axis in front of the input's own shape (``(N, 1, 3, 224, 224)`` for an input
  ``(batch, 3, 224, 224)``), or with the batch axis itself read as the sample
  axis (``(N, 3, 224, 224)``);
* a folder of ``.npz`` files, one sample each, keyed by input name;
* an iterable of feed dicts (from Python).

Every sample is checked before anything runs, and a bad one raises a
GraphoptError that names the input and says what was expected: a missing
input, the wrong kind of dtype (float where int64 token ids are expected;
float64 is cast to float32 silently), the wrong rank or a wrong static dim, or
NaN in a float input.
Activations are then read by running onnxruntime with intermediate values
exposed as extra outputs, batch by batch, so memory stays bounded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.verify.inputs import InputSpec, input_specs
from graphopt.verify.runtime import LoadedModel, open_session, run_session

log = logging.getLogger(__name__)

Sample = dict[str, np.ndarray]
CalibSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


class CalibrationError(GraphoptError):
    """Calibration data that does not fit the model."""


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds for a bad file
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {exc}") from None


def _split_stacked(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> list[Sample]:
    """Samples from one array per input with a leading sample axis (or the batch axis read as one)."""
    ranks = {s.name: len(s.dims) for s in specs if s.dims is not None}
    counts, samples = {}, {}
    for spec in specs:
        if spec.name not in arrays:
            have = ", ".join(sorted(map(str, arrays))) or "nothing"
            raise CalibrationError(f"calibration data has no input {spec.name!r} (it has: {have})")
        array = np.asarray(arrays[spec.name])
        rank = ranks.get(spec.name)
        if rank is not None and array.ndim == rank + 1:
            samples[spec.name] = [array[i] for i in range(array.shape[0])]
        elif rank is not None and array.ndim == rank and rank > 0:
            samples[spec.name] = [array[i: i + 1] for i in range(array.shape[0])]
        else:
            want = f"rank {rank + 1} (samples, {_dims(spec)}) or {rank}" if rank is not None else "a sample axis"
            raise CalibrationError(f"calibration input {spec.name!r} has rank {array.ndim}; expected {want}")
        counts[spec.name] = len(samples[spec.name])
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"calibration inputs hold different numbers of samples: {counts}")
    n = next(iter(counts.values()), 0)
    return [{name: values[i] for name, values in samples.items()} for i in range(n)]


def _dims(spec: InputSpec) -> str:
    return ", ".join("?" if d is None else str(d) for d in spec.dims or ())


def load_calibration(source: CalibSource, proto: onnx.ModelProto, limit: int | None = None) -> list[Sample]:
    """Checked calibration samples (at most ``limit``) for the model's inputs."""
    specs = [s for s in input_specs(proto)]
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise CalibrationError(f"calibration folder {str(path)!r} holds no .npz files")
            samples = [_read_npz(f) for f in files[: limit or None]]
        elif path.is_file():
            samples = _split_stacked(_read_npz(path), specs)
        else:
            raise CalibrationError(f"no such calibration file or folder: {str(path)!r}")
    elif isinstance(source, Mapping):
        samples = _split_stacked(source, specs)
    else:
        samples = [dict(s) for s in source]
    if limit:
        samples = samples[:limit]
    if not samples:
        raise CalibrationError("the calibration data holds no samples")
    return [check_sample(s, specs, i) for i, s in enumerate(samples)]


def check_sample(sample: Mapping[str, Any], specs: Sequence[InputSpec], index: int = 0) -> Sample:
    """One sample with every model input present and of the right kind, rank and static dims."""
    if not isinstance(sample, Mapping):
        raise CalibrationError(f"calibration sample {index} is a {type(sample).__name__}, not a dict of inputs")
    out = {}
    for spec in specs:
        if spec.name not in sample:
            have = ", ".join(sorted(map(str, sample))) or "nothing"
            raise CalibrationError(f"calibration data has no input {spec.name!r} (sample {index} has: {have})")
        array = np.asarray(sample[spec.name])
        if spec.dtype is not None and array.dtype != spec.dtype:
            if array.dtype.kind == spec.dtype.kind == "f":
                array = array.astype(spec.dtype)
            else:
                raise CalibrationError(f"calibration input {spec.name!r} is {array.dtype}, the model expects "
                                       f"{spec.dtype} (sample {index})")
        if array.dtype.kind == "f" and np.isnan(array).any():
            # Ranges and refits taken over NaN are NaN; infinities may be meant (additive masks), NaN never is.
            raise CalibrationError(f"calibration input {spec.name!r} holds NaN (sample {index})")
        if spec.dims is not None:
            if array.ndim != len(spec.dims):
                raise CalibrationError(f"calibration input {spec.name!r} has rank {array.ndim} (shape "
                                       f"{tuple(array.shape)}), the model expects rank {len(spec.dims)}: "
                                       f"({_dims(spec)}) (sample {index})")
            for axis, (want, got) in enumerate(zip(spec.dims, array.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise CalibrationError(f"calibration input {spec.name!r} has shape {tuple(array.shape)}, the "
                                           f"model expects ({_dims(spec)}): axis {axis} must be {want} "
                                           f"(sample {index})")
        out[spec.name] = array
    extra = sorted(set(map(str, sample)) - {s.name for s in specs})
    if extra and index == 0:
        log.warning("calibration data has entries that are not model inputs, ignored: %s", ", ".join(extra))
    return out


def batches(samples: Sequence[Sample], proto: onnx.ModelProto, size: int = 16) -> list[Sample]:
    """Stack consecutive same-shaped samples along the batch axis when every input's batch dim is dynamic."""
    dynamic = all(s.dims and not isinstance(s.dims[0], int) for s in input_specs(proto))
    if not dynamic:
        return list(samples)
    out, run = [], []
    for sample in samples:
        if run and (len(run) >= size or any(run[0][k].shape != v.shape for k, v in sample.items())):
            out.append({k: np.concatenate([s[k] for s in run]) for k in run[0]})
            run = []
        run.append(sample)
    if run:
        out.append({k: np.concatenate([s[k] for s in run]) for k in run[0]})
    return out


CALIB_HINT = "check that the calibration data fits the model: the failing inputs' shapes are named above"


def run_exposed(proto: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Sample],
                label: str = "model") -> Iterator[dict[str, np.ndarray]]:
    """Run ``proto`` on each feed dict with the values ``names`` exposed; yields {name: array}."""
    graph_outputs = {o.name for o in proto.graph.output}
    extra = [n for n in dict.fromkeys(names) if n not in graph_outputs]
    with open_session(LoadedModel(proto), extra, label=label) as sess:
        for feed in feeds:
            yield run_session(sess, feed, list(dict.fromkeys(names)), label=label, hint=CALIB_HINT)


def activation_stats(proto: onnx.ModelProto, wanted: Mapping[str, set[int]], feeds: Sequence[Sample],
                     covariance: Iterable[tuple[str, int]] = ()) -> dict[tuple[str, int], Any]:
    """Per requested (value, axis): E[x^2] per element along the axis, over all calibration data.

    For the keys in ``covariance`` the entry is instead ``(E[x^2], covariance matrix)`` of the elements
    along the axis (every other position being a sample), which the ``recon`` criterion needs.
    """
    cov_keys = set(covariance)
    sums: dict[tuple[str, int], Any] = {}
    counts: dict[tuple[str, int], int] = {}
    for values in run_exposed(proto, list(wanted), feeds, label="model (calibration)"):
        for name, axes in wanted.items():
            array = np.asarray(values[name], dtype=np.float32)
            for axis in axes:
                moved = np.ascontiguousarray(np.moveaxis(array, axis, 0)).reshape(array.shape[axis], -1)
                key = (name, axis)
                part = [np.einsum("ij,ij->i", moved, moved, dtype=np.float64)]
                if key in cov_keys:
                    part += [moved.sum(axis=1, dtype=np.float64), (moved @ moved.T).astype(np.float64)]
                sums[key] = part if key not in sums else [a + b for a, b in zip(sums[key], part, strict=True)]
                counts[key] = counts.get(key, 0) + moved.shape[1]
    out: dict[tuple[str, int], Any] = {}
    for key, part in sums.items():
        n = max(counts[key], 1)
        if key in cov_keys:
            mean = part[1] / n
            out[key] = (part[0] / n, part[2] / n - np.outer(mean, mean))
        else:
            out[key] = part[0] / n
    return out
