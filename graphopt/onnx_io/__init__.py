"""Loading and saving ONNX models: the only place where ONNX protobuf meets the IR.

- ``load`` accepts a path, bytes or a ModelProto. From a path, weights are not
  read: initializers point at their byte ranges in the file (see ``wire``).
- ``save`` writes atomically (temporary files renamed into place), streams the
  weights, and uses external data when the model needs it (over 2 GB, or it
  came with external data).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import tempfile
from collections.abc import Iterator

import onnx
from google.protobuf.message import DecodeError

from ..errors import ModelLoadError, ModelSaveError
from ..ir.model import Model
from ..ir.tensor import DataSource, SourceTensor, Tensor
from .exporter import Exporter, ExternalSink, data_file_name, total_weight_bytes, uses_external_source
from .importer import Importer
from .wire import ScannedModel, scan_model, write_model

__all__ = ["load", "save", "to_proto", "to_bytes", "to_proto_without_weights", "runnable", "ModelLike"]

ModelLike = str | os.PathLike | bytes | onnx.ModelProto
PROTOBUF_LIMIT = 2_000_000_000  # a single protobuf message cannot exceed 2 GiB; stay below it


def load(source: ModelLike | Model, *, base_dir: str | None = None) -> Model:
    """Load a model from a path, serialized bytes, or a ModelProto (a Model passes through)."""
    if isinstance(source, Model):
        return source
    if isinstance(source, onnx.ModelProto):
        importer = Importer(base_dir)
        return importer.model(source)
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        return _load_scanned(view, len(view), DataSource(buffer=view), base_dir, None)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ModelLoadError(f"no such model file: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"{path}: the file is empty, not an ONNX model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        path = os.path.abspath(path)
        return _load_scanned(mm, size, DataSource(path=path), base_dir or os.path.dirname(path), path)


def _load_scanned(buf, size: int, source: DataSource, base_dir: str | None, path: str | None) -> Model:
    where = path or "<bytes>"
    try:
        scanned = scan_model(buf, size)
        model_proto = onnx.ModelProto.FromString(scanned.model_rest)
        graph_proto = onnx.GraphProto.FromString(scanned.graph_rest)
    except ModelLoadError as err:
        raise ModelLoadError(f"{where}: {err}") from None
    except DecodeError as err:
        raise ModelLoadError(f"{where}: corrupt ONNX file, protobuf could not parse it ({err})") from None
    model_proto.graph.CopyFrom(graph_proto)
    importer = Importer(base_dir)
    initializers = _initializer_tensors(scanned, source, importer)
    model = importer.model(model_proto, initializers)
    model.source_path = path
    return model


def _initializer_tensors(scanned: ScannedModel, source: DataSource, importer: Importer) -> list[Tensor]:
    tensors = []
    for raw in scanned.initializers:
        try:
            header = onnx.TensorProto.FromString(raw.header)
        except DecodeError as err:
            raise ModelLoadError(f"corrupt ONNX file: an initializer could not be parsed ({err})") from None
        if raw.raw_offset is None:
            tensors.append(importer.tensor(header))
        else:
            tensors.append(SourceTensor(header, source, raw.raw_offset, raw.raw_length))
    return tensors


def to_proto(model: Model) -> onnx.ModelProto:
    """The model as an in-memory ModelProto (weights inline; for small models and tests)."""
    return onnx.ModelProto.FromString(to_bytes(model))


def to_bytes(model: Model) -> bytes:
    """The model serialized (weights inline). Fails above the 2 GB protobuf limit; use save."""
    if total_weight_bytes(model) > PROTOBUF_LIMIT:
        raise ModelSaveError("the model is over 2 GB: save it to a file (external data) instead of bytes")
    out = io.BytesIO()
    _write(model, out, Exporter())
    return out.getvalue()


@contextlib.contextmanager
def runnable(model: Model, workdir: str | None = None) -> Iterator[bytes | str]:
    """The model in a form onnxruntime can load: bytes, or for models over the 2 GB
    protobuf limit a temporary file with external data (in ``workdir``), removed after."""
    if total_weight_bytes(model) <= PROTOBUF_LIMIT:
        yield to_bytes(model)
        return
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".graphopt-") as folder:
        path = os.path.join(folder, "model.onnx")
        save(model, path, external_data=True)
        yield path


def save(model: Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write ``model`` to ``path`` atomically.

    ``external_data``: None chooses (external if the model is over 2 GB or was
    loaded with external data), True/False forces. External data goes to
    ``<file name>.data`` beside the model.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise ModelSaveError(f"cannot write {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ModelSaveError(f"cannot write {path}: it is a folder")
    if external_data is None:
        external_data = uses_external_source(model) or total_weight_bytes(model) > PROTOBUF_LIMIT
    data_path = os.path.join(folder, data_file_name(path))
    _refuse_overwriting_sources(model, [path, data_path] if external_data else [path])
    with _atomic(path) as out:
        if not external_data:
            _write(model, out, Exporter())
            if out.tell() > PROTOBUF_LIMIT:
                raise ModelSaveError("the model is over 2 GB: save it with external data")
            return
        with _atomic(data_path) as data_out:
            _write(model, out, Exporter(ExternalSink(data_out, os.path.basename(data_path))))


def _write(model: Model, out, exporter: Exporter) -> None:
    proto = exporter.model(model)
    graph_rest = proto.graph.SerializeToString()
    proto.ClearField("graph")
    pieces = [exporter.initializer_pieces(v) for v in model.graph.initializers.values()]
    write_model(out, proto.SerializeToString(), graph_rest, pieces)


def _refuse_overwriting_sources(model: Model, targets: list[str]) -> None:
    sources = {os.path.realpath(model.source_path)} if model.source_path else set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const, SourceTensor) and value.const.source.path:
                sources.add(os.path.realpath(value.const.source.path))
    for target in targets:
        if os.path.realpath(target) in sources:
            raise ModelSaveError(f"refusing to overwrite {target}: the model being saved reads from it",
                                 hint="write the output to a different path")


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[io.BufferedWriter]:
    """A temp file beside ``path``, renamed over it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_proto_without_weights(model: Model, max_inline_bytes: int = 4096) -> onnx.ModelProto:
    """The model with big top-level initializers turned into typed graph inputs.

    For analyses that need shapes and small constants (shape inference with data
    propagation) but not the weights, at a fraction of the memory.
    """
    exporter = Exporter()
    proto = exporter.model(model)
    for value in model.graph.initializers.values():
        tensor = value.const
        if tensor.size * tensor.dtype.itemsize <= max_inline_bytes:
            proto.graph.initializer.append(exporter.tensor(tensor, value.name))
        elif not value.is_graph_input():
            proto.graph.input.append(exporter.value_info(value))
    return proto
