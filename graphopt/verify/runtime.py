"""Loading models and running them in onnxruntime for verification.

Every session is created the same way: CPU provider, two intra-op threads that
do not spin (several sessions are often alive at once, and spinning threads of
one slow the others down), and ``ORT_DISABLE_ALL`` so that onnxruntime runs
the graph as written. That makes the reference a faithful reading of the
ONNX semantics rather than of onnxruntime's own rewrites, and keeps every
intermediate value addressable by its name for bisection.

Models given as a path are handed to onnxruntime as a path, so external data
is resolved relative to the model's folder; the proto kept for inspection is
loaded without its external data. A model with unseeded random ops is run with
seeds derived from their names (see :mod:`graphopt.onnx_io.random_ops`), so
two models holding the same random ops draw the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.onnx_io.random_ops import draws_random, seed_value
from graphopt.onnx_io.walk import model_nodes
from graphopt.verify.errors import VerificationError

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

RUN_HINT = "give input sizes the model accepts (--shape NAME=DIMS or --shape DIM=N) or real inputs (--inputs FILE.npz)"
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
# Element types numpy cannot hold natively: onnxruntime's ``run`` cannot return them,
# so they come back as OrtValues and are copied into ml_dtypes arrays.
_EXOTIC_ORT_TYPES = {
    "tensor(bfloat16)": onnx.TensorProto.BFLOAT16,
    "tensor(float8e4m3fn)": onnx.TensorProto.FLOAT8E4M3FN,
    "tensor(float8e4m3fnuz)": onnx.TensorProto.FLOAT8E4M3FNUZ,
    "tensor(float8e5m2)": onnx.TensorProto.FLOAT8E5M2,
    "tensor(float8e5m2fnuz)": onnx.TensorProto.FLOAT8E5M2FNUZ,
}


@dataclass
class LoadedModel:
    """A model ready to hand to onnxruntime.

    ``proto`` is for inspection (external data not loaded when read from a
    path); ``path`` and ``raw`` are what onnxruntime gets when the model is run
    unchanged.
    """

    proto: onnx.ModelProto
    path: Path | None = None
    raw: bytes | None = None


def load_model(model: ModelLike | LoadedModel) -> LoadedModel:
    """Accept a path, serialized bytes, a ``ModelProto`` or an already loaded model."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(model)
    if isinstance(model, bytes):
        try:
            return LoadedModel(onnx.load_from_string(model), raw=model)
        except Exception as exc:  # protobuf raises its own DecodeError
            raise VerificationError(f"cannot parse the model bytes: {exc}") from exc
    path = Path(model)
    if not path.is_file():
        raise VerificationError(f"model file {str(path)!r} does not exist")
    try:
        return LoadedModel(onnx.load(str(path), load_external_data=False), path=path)
    except Exception as exc:
        raise VerificationError(f"cannot read model {str(path)!r}: {exc}") from exc


def session_options(external_folder: Path | None = None) -> ort.SessionOptions:
    """Session options shared by every verification run (see module docstring)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 4  # failures reach the user as VerificationError, not as ORT log lines
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if external_folder is not None:
        so.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(external_folder))
    return so


@contextlib.contextmanager
def open_session(
    model: LoadedModel, extra_outputs: Sequence[str] = (), label: str = "model"
) -> Iterator[ort.InferenceSession]:
    """Create an onnxruntime session, optionally exposing extra values as outputs.

    Extra outputs are appended to the proto's graph outputs only while it is
    serialized and removed again afterwards, so a large in-memory model is never
    copied; they carry no type, which onnxruntime fills in by inference.
    """
    unseeded = unseeded_random_nodes(model.proto)
    with contextlib.ExitStack() as stack:
        if not extra_outputs and not unseeded and model.path is not None:
            source: str | bytes = str(model.path)
            folder = None
        elif not extra_outputs and not unseeded and model.raw is not None:
            source, folder = model.raw, None
        else:
            with _seeded(unseeded):
                source = _serialize_with_outputs(model.proto, extra_outputs, stack)
            folder = model.path.parent if model.path is not None else None
        try:
            sess = ort.InferenceSession(source, session_options(folder), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise VerificationError(f"onnxruntime cannot load the {label}: {_first_line(exc)}") from exc
        yield sess


def unseeded_random_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of ``proto`` (subgraphs and functions included) that may draw random numbers with no seed."""
    return [n for n in model_nodes(proto)
            if draws_random(n.op_type, n.domain, n.input) and all(a.name != "seed" for a in n.attribute)]


@contextlib.contextmanager
def _seeded(nodes: Sequence[onnx.NodeProto]) -> Iterator[None]:
    """Give each node a seed derived from its name (or first output's) while the block runs."""
    for node in nodes:
        node.attribute.append(onnx.helper.make_attribute("seed", seed_value(node.op_type, node.name, node.output[0])))
    try:
        yield
    finally:
        for node in nodes:
            del node.attribute[-1]


def _serialize_with_outputs(
    proto: onnx.ModelProto, extra_outputs: Sequence[str], stack: contextlib.ExitStack
) -> str | bytes:
    """Bytes of ``proto`` with extra outputs, or a temporary path when over 2 GB."""
    graph = proto.graph
    n_outputs = len(graph.output)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs)
    try:
        if proto.ByteSize() <= _PROTOBUF_LIMIT:
            return proto.SerializeToString()
        # onnx.save with external data rewrites the tensors it saves: work on a copy.
        big = copy.deepcopy(proto)
    finally:
        del graph.output[n_outputs:]
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="graphopt-verify-"))
    path = os.path.join(folder, "model.onnx")
    logger.info("model is over 2 GB: saving it with external data to %s for onnxruntime", folder)
    onnx.save_model(big, path, save_as_external_data=True, all_tensors_to_one_file=True, location="data.bin")
    return path


def to_feed(value: np.ndarray) -> Any:
    """numpy arrays go to onnxruntime as they are, ml_dtypes ones (bfloat16, float8) as OrtValues."""
    if value.dtype.kind == "V":
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        raw = np.require(value, requirements="C").view(np.uint8 if value.dtype.itemsize == 1 else np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem)
    return value


def run_session(
    sess: ort.InferenceSession, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
    *, label: str = "model", hint: str = RUN_HINT,
) -> dict[str, Any]:
    """Run a session and return ``{output name: value}`` as numpy arrays (lists for sequences).

    A run failure raises :class:`VerificationError` naming ``label`` and the input shapes, with ``hint``.
    """
    types = {o.name: o.type for o in sess.get_outputs()}
    names = list(output_names) if output_names is not None else list(types)
    if not names:
        return {}  # sess.run with no names would run every output
    feeds = {name: to_feed(np.asarray(value)) for name, value in inputs.items()}
    exotic = any(types.get(n) in _EXOTIC_ORT_TYPES for n in names)
    if exotic and any(not isinstance(v, ort.OrtValue) and v.dtype.kind in "OUS" for v in feeds.values()):
        raise VerificationError("a model with string inputs and bfloat16/float8 outputs is not supported")
    try:
        if not exotic:
            return dict(zip(names, sess.run(names, feeds), strict=True))
        ort_feeds = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()
        }
        values = sess.run_with_ort_values(names, ort_feeds)
    except Exception as exc:
        shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in inputs.items())
        raise VerificationError(f"onnxruntime failed to run the {label} on inputs {shapes}: {_first_line(exc)}",
                                hint=hint) from exc
    return {name: _ortvalue_to_numpy(value, types[name]) for name, value in zip(names, values, strict=True)}


def _ortvalue_to_numpy(value: ort.OrtValue, ort_type: str) -> np.ndarray:
    """Copy a CPU OrtValue into numpy, using ml_dtypes for types numpy lacks."""
    if not value.is_tensor():
        raise VerificationError(f"cannot read a {ort_type} value from a model with bfloat16/float8 values")
    if ort_type not in _EXOTIC_ORT_TYPES:
        return value.numpy()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(_EXOTIC_ORT_TYPES[ort_type])
    out = np.empty(value.shape(), dtype=dtype)
    ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
    return out


def run_model(
    model: ModelLike | LoadedModel,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    *,
    label: str = "model",
) -> dict[str, np.ndarray]:
    """Run ``model`` in onnxruntime (CPU, no graph optimizations) and return its outputs by name.

    ``output_names`` selects outputs (default: all graph outputs). Load and run
    failures raise :class:`VerificationError` naming ``label`` and the input shapes.
    """
    loaded = load_model(model)
    with open_session(loaded, label=label) as sess:
        return run_session(sess, inputs, output_names, label=label)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
