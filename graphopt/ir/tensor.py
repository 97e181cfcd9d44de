"""Tensor payloads of initializers and tensor attributes, kept lazy.

A model's weights are the bulk of its bytes, and most passes never look at
them. So an initializer holds a :class:`Tensor` that knows its name, dtype and
shape but reads its data only when ``numpy()`` is called, and the exporter
streams the bytes from where they already are (the source file, an external
data file, an in-memory buffer) into the output without materialising them.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper, numpy_helper

_CHUNK = 16 << 20

# dtypes whose raw_data layout is exactly numpy's little-endian buffer (no
# sub-byte packing, no string payloads), so bytes can be streamed as they are.
_PACKED_DTYPES = {
    onnx.TensorProto.STRING,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
    getattr(onnx.TensorProto, "FLOAT4E2M1", -1),
    getattr(onnx.TensorProto, "INT2", -1),
    getattr(onnx.TensorProto, "UINT2", -1),
}


def numpy_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype onnx uses for an ONNX element type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def little_endian_bytes(array: np.ndarray) -> np.ndarray:
    """The array's little-endian bytes as a flat uint8 array.

    Not ``memoryview(array).cast("B")``: that refuses ml_dtypes' types (bfloat16, float8) and empty arrays.
    """
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8)


class DataSource:
    """A byte range provider: a file (read with pread) or an in-memory buffer."""

    def __init__(self, path: str | None = None, buffer: memoryview | None = None, *,
                 external: bool = False) -> None:
        if (path is None) == (buffer is None):
            raise ValueError("DataSource needs exactly one of path or buffer")
        self.path = os.path.abspath(path) if path is not None else None
        self.buffer = buffer
        self.external = external  # an ONNX external-data file, not the model file itself
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _fileno(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def size(self) -> int:
        if self.buffer is not None:
            return len(self.buffer)
        return os.fstat(self._fileno()).st_size

    def read(self, offset: int, length: int) -> bytes | memoryview:
        if self.buffer is not None:
            return self.buffer[offset : offset + length]
        out = bytearray(length)
        view, fd, done = memoryview(out), self._fileno(), 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise EOFError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n
        return out

    def copy_to(self, out: BinaryIO, offset: int, length: int) -> None:
        """Append a byte range to ``out`` without holding it all in memory.

        Files are copied by the kernel (copy_file_range) when both ends are real
        files, so the bytes never enter this process.
        """
        if self.buffer is not None:
            out.write(self.buffer[offset : offset + length])
            return
        done = 0
        try:
            dst = out.fileno()
            out.flush()
            while done < length:
                n = os.copy_file_range(self._fileno(), dst, length - done, offset + done)
                if n <= 0:
                    raise OSError("copy_file_range made no progress")
                done += n
        except (OSError, ValueError):
            pass  # not a real file, or the kernel cannot copy across these files: use chunks
        if hasattr(out, "seek"):
            out.seek(0, os.SEEK_END)
        while done < length:
            chunk = self.read(offset + done, min(_CHUNK, length - done))
            out.write(chunk)
            done += len(chunk)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Tensor(ABC):
    """A named constant tensor: metadata always at hand, data on demand."""

    name: str
    elem_type: int
    shape: tuple[int, ...]
    doc_string: str = ""

    @abstractmethod
    def numpy(self) -> np.ndarray:
        """The data as a numpy array (read or decoded now)."""

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.elem_type)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def raw_length(self) -> int | None:
        """Length of the little-endian raw bytes if they can be streamed, else None."""
        if self.elem_type in _PACKED_DTYPES:
            return None
        return self.size * self.dtype.itemsize

    def data_problem(self) -> str | None:
        """Why the data cannot be read as the element type and dims say (None: it can), checked without
        reading it: an unknown type, negative dims, or a stored length other than the dims need."""
        try:
            itemsize = self.dtype.itemsize
        except (KeyError, ValueError, TypeError):
            return f"has an unknown element type ({self.elem_type})"
        if any(d < 0 for d in self.shape):
            return f"has negative dims {list(self.shape)}"
        if self.elem_type == onnx.TensorProto.STRING and self._holds_raw_bytes():
            return "is a string tensor stored as raw bytes, which ONNX does not allow"
        stored = self._stored_bytes()
        if stored is not None and stored != self.size * itemsize:
            kind = onnx.TensorProto.DataType.Name(self.elem_type)
            dims = list(self.shape)
            return f"holds data for {stored / itemsize:g} {kind} values, but its dims {dims} need {self.size}"
        return None

    def _stored_bytes(self) -> int | None:
        """Bytes of data the tensor holds, where that is known without decoding it."""
        return None

    def _holds_raw_bytes(self) -> bool:
        return False

    def write_raw(self, out: BinaryIO) -> None:
        """Write the raw little-endian bytes (only when ``raw_length()`` is not None)."""
        out.write(little_endian_bytes(np.asarray(self.numpy(), dtype=self.dtype)))

    def to_proto(self) -> onnx.TensorProto:
        """A complete TensorProto (data inline)."""
        proto = numpy_helper.from_array(self.numpy(), self.name)
        proto.data_type = self.elem_type
        if self.doc_string:
            proto.doc_string = self.doc_string
        return proto

    def header(self) -> onnx.TensorProto:
        """A TensorProto with everything but the data."""
        proto = onnx.TensorProto(name=self.name, data_type=self.elem_type, dims=self.shape)
        if self.doc_string:
            proto.doc_string = self.doc_string
        return proto

    def __repr__(self) -> str:
        dtype = onnx.TensorProto.DataType.Name(self.elem_type)
        return f"{type(self).__name__}({self.name!r}, {dtype}, {self.shape})"


class ArrayTensor(Tensor):
    """A tensor held as a numpy array (what passes create)."""

    def __init__(self, array: np.ndarray, name: str = "", elem_type: int | None = None) -> None:
        self._array = np.asarray(array)
        self.name = name
        if elem_type is None:
            elem_type = helper.np_dtype_to_tensor_dtype(self._array.dtype)
        self.elem_type = elem_type
        self.shape = tuple(int(d) for d in self._array.shape)
        self.doc_string = ""

    def numpy(self) -> np.ndarray:
        return self._array


class ProtoTensor(Tensor):
    """A tensor still in its TensorProto (small tensors, attribute values, ModelProto input)."""

    def __init__(self, proto: onnx.TensorProto, base_dir: str | None = None) -> None:
        self.proto = proto
        self.name = proto.name
        self.elem_type = proto.data_type
        self.shape = tuple(proto.dims)
        self.doc_string = proto.doc_string
        self._base_dir = base_dir

    def numpy(self) -> np.ndarray:
        return numpy_helper.to_array(self.proto, self._base_dir or "")

    def raw_length(self) -> int | None:
        return None  # already a proto: the exporter writes it as it is

    def _holds_raw_bytes(self) -> bool:
        return self.proto.HasField("raw_data")

    def _stored_bytes(self) -> int | None:
        proto = self.proto
        if self.elem_type == onnx.TensorProto.STRING:
            return None if proto.HasField("raw_data") else len(proto.string_data) * self.dtype.itemsize
        if self.elem_type in _PACKED_DTYPES or proto.data_location == onnx.TensorProto.EXTERNAL:
            return None
        if proto.HasField("raw_data"):
            return len(proto.raw_data)
        values = len(getattr(proto, helper.tensor_dtype_to_field(self.elem_type)))
        per_element = 2 if self.elem_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
        return values // per_element * self.dtype.itemsize if values % per_element == 0 else -1

    def to_proto(self) -> onnx.TensorProto:
        return self.proto


class SourceTensor(Tensor):
    """A tensor whose raw bytes lie in a byte range of a file or buffer, not yet read.

    Covers both initializers inside a loaded .onnx file and ONNX external data.
    """

    def __init__(self, header: onnx.TensorProto, source: DataSource, offset: int, length: int) -> None:
        self.name = header.name
        self.elem_type = header.data_type
        self.shape = tuple(header.dims)
        self.doc_string = header.doc_string
        self.source, self.offset, self.length = source, offset, length

    def raw_bytes(self) -> bytes | memoryview:
        return self.source.read(self.offset, self.length)

    def numpy(self) -> np.ndarray:
        if self.elem_type in _PACKED_DTYPES:
            proto = self.header()
            proto.raw_data = bytes(self.raw_bytes())
            return numpy_helper.to_array(proto)
        array = np.frombuffer(self.raw_bytes(), dtype=self.dtype.newbyteorder("<"))
        return array.reshape(self.shape)

    def raw_length(self) -> int | None:
        return self.length

    def _stored_bytes(self) -> int | None:
        return None if self.elem_type in _PACKED_DTYPES else self.length

    def _holds_raw_bytes(self) -> bool:
        return True

    def write_raw(self, out: BinaryIO) -> None:
        self.source.copy_to(out, self.offset, self.length)

    def to_proto(self) -> onnx.TensorProto:
        proto = self.header()
        proto.raw_data = bytes(self.raw_bytes())
        return proto
