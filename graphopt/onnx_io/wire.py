"""Protobuf wire-format scanning and writing for ONNX files, without touching weights.

``onnx.load`` reads the whole file and parses every tensor into memory (two
copies of the weights at its peak) and ``onnx.save`` serializes them all into
one more buffer. graphopt instead walks the top-level fields of the ModelProto
and GraphProto, parses everything except the initializers' ``raw_data``
normally, and remembers where each raw_data lies in the file. Saving streams
those byte ranges straight into the output. The wire format is simple enough
(varint tags, length-delimited fields) that this needs no protobuf internals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import ModelLoadError

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
_LENGTH_DELIMITED = 2


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_header(number: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited field."""
    return encode_varint((number << 3) | _LENGTH_DELIMITED) + encode_varint(length)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise ModelLoadError(f"corrupt or truncated ONNX file: a varint runs past byte {end}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ModelLoadError(f"corrupt ONNX file: malformed varint at byte {pos}")


@dataclass
class Field:
    number: int
    start: int  # first byte of the tag
    value_start: int  # first byte of the payload (after any length prefix)
    end: int  # one past the last byte


def iter_fields(buf, start: int, end: int) -> Iterator[Field]:
    """The top-level fields of the message stored in ``buf[start:end]``."""
    pos = start
    while pos < end:
        tag, value_start = _read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ModelLoadError(f"corrupt ONNX file: invalid field number 0 at byte {pos}")
        if wire_type == 0:
            _, stop = _read_varint(buf, value_start, end)
        elif wire_type == 1:
            stop = value_start + 8
        elif wire_type == 5:
            stop = value_start + 4
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _read_varint(buf, value_start, end)
            stop = value_start + length
        else:
            raise ModelLoadError(f"corrupt ONNX file: unsupported wire type {wire_type} at byte {pos}")
        if stop > end:
            raise ModelLoadError(
                f"corrupt or truncated ONNX file: field {number} at byte {pos} needs {stop - end} more bytes"
            )
        yield Field(number, pos, value_start, stop)
        pos = stop


@dataclass
class RawInitializer:
    """An initializer as found in the file: its header bytes and where its raw_data lies."""

    header: bytes
    raw_offset: int | None = None
    raw_length: int = 0


@dataclass
class ScannedModel:
    """A ModelProto split into what is parsed normally and the initializer payloads."""

    model_rest: bytes  # every ModelProto field but the graph
    graph_rest: bytes  # every GraphProto field but the initializers
    initializers: list[RawInitializer] = field(default_factory=list)


def _join(buf, ranges: list[tuple[int, int]]) -> bytes:
    """Concatenate byte ranges, merging adjacent ones so big runs are copied once."""
    merged: list[list[int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return b"".join(bytes(buf[a:b]) for a, b in merged)


def scan_model(buf, size: int) -> ScannedModel:
    """Split a serialized ModelProto; ``buf`` supports ``buf[i]`` and slicing (mmap, memoryview)."""
    model_ranges, graph_ranges, initializers = [], [], []
    for f in iter_fields(buf, 0, size):
        if f.number != MODEL_GRAPH:
            model_ranges.append((f.start, f.end))
            continue
        for g in iter_fields(buf, f.value_start, f.end):
            if g.number != GRAPH_INITIALIZER:
                graph_ranges.append((g.start, g.end))
                continue
            header, raw = [], None
            for t in iter_fields(buf, g.value_start, g.end):
                if t.number == TENSOR_RAW_DATA:
                    raw = (t.value_start, t.end - t.value_start)
                else:
                    header.append((t.start, t.end))
            item = RawInitializer(_join(buf, header))
            if raw is not None:
                item.raw_offset, item.raw_length = raw
            initializers.append(item)
    return ScannedModel(_join(buf, model_ranges), _join(buf, graph_ranges), initializers)


@dataclass
class Piece:
    """A chunk of output: literal bytes, or a writer that streams ``length`` bytes."""

    length: int
    data: bytes | None = None
    write: Callable[[BinaryIO], None] | None = None


def split_before(serialized: bytes, number: int) -> tuple[bytes, bytes]:
    """Split a serialized message into its fields numbered below ``number`` and the rest.

    Serialized protos list fields in number order; writing the streamed field in
    its place keeps the output byte-identical to what protobuf itself would write.
    """
    for f in iter_fields(serialized, 0, len(serialized)):
        if f.number > number:
            return serialized[: f.start], serialized[f.start :]
    return serialized, b""


def write_model(
    out: BinaryIO, model_rest: bytes, graph_rest: bytes, initializer_pieces: list[list[Piece]]
) -> int:
    """Write a ModelProto whose graph's initializers are streamed; returns the bytes written.

    Each entry of ``initializer_pieces`` is the serialized body of one TensorProto
    in pieces (header bytes, raw_data tag, raw bytes streamed from a source).
    """
    bodies = [(sum(p.length for p in pieces), pieces) for pieces in initializer_pieces]
    graph_length = len(graph_rest) + sum(len(field_header(GRAPH_INITIALIZER, n)) + n for n, _ in bodies)
    model_head, model_tail = split_before(model_rest, MODEL_GRAPH)
    graph_head, graph_tail = split_before(graph_rest, GRAPH_INITIALIZER)
    out.write(model_head)
    out.write(field_header(MODEL_GRAPH, graph_length))
    out.write(graph_head)
    for length, pieces in bodies:
        out.write(field_header(GRAPH_INITIALIZER, length))
        for piece in pieces:
            if piece.data is not None:
                out.write(piece.data)
            else:
                piece.write(out)
    out.write(graph_tail)
    out.write(model_tail)
    return len(model_rest) + len(field_header(MODEL_GRAPH, graph_length)) + graph_length
