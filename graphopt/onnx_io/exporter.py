"""graphopt IR -> ONNX protobuf.

The main graph's initializers are not put into the GraphProto: the caller
streams them (see :mod:`.wire`), so the weights are never serialized into one
big in-memory buffer. Nested tensors (subgraph initializers, tensor attributes)
are small and go inline, or to the external-data sink when one is given.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import onnx

from ..ir.graph import Graph, Node, Value
from ..ir.model import Function, Model
from ..ir.tensor import SourceTensor, Tensor
from ..ir.types import Attr, AttrType, OpaqueType, OptionalType, SequenceType, TensorType, ValueType
from .wire import TENSOR_RAW_DATA, Piece, field_header

_STR = "surrogateescape"
EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors stay inline (as onnx.save does)
_ALIGN = 64


class ExternalSink:
    """Appends tensor payloads to one external-data file, aligned, and records where."""

    def __init__(self, out: BinaryIO, location: str) -> None:
        self.out, self.location, self.offset = out, location, 0

    def add(self, tensor: Tensor) -> onnx.TensorProto:
        """Write the tensor's data; return its header pointing at it."""
        pad = -self.offset % _ALIGN
        self.out.write(b"\0" * pad)
        self.offset += pad
        length = tensor.raw_length()
        tensor.write_raw(self.out)
        header = tensor.header()
        header.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", self.offset), ("length", length)):
            header.external_data.add(key=key, value=str(value))
        self.offset += length
        return header


def wants_external(tensor: Tensor) -> bool:
    """Big tensors with a raw byte layout go external; packed and string tensors cannot."""
    length = tensor.raw_length()
    return length is not None and length >= EXTERNAL_THRESHOLD


class Exporter:
    def __init__(self, sink: ExternalSink | None = None) -> None:
        self.sink = sink

    # -- model ---------------------------------------------------------------------
    def model(self, model: Model) -> onnx.ModelProto:
        """The ModelProto with every field except the main graph's initializers."""
        proto = _make(onnx.ModelProto, ir_version=model.ir_version, producer_name=model.producer_name,
                      producer_version=model.producer_version, domain=model.domain,
                      model_version=model.model_version, doc_string=model.doc_string)
        _opsets(proto.opset_import, model.opset_imports)
        _metadata(proto.metadata_props, model.metadata)
        proto.functions.extend(self.function(f) for f in model.functions)
        proto.graph.CopyFrom(self.graph(model.graph, initializers=False))
        for number, items in model.extras.items():
            container = getattr(proto, proto.DESCRIPTOR.fields_by_number[number].name)
            for item in items:
                container.add().ParseFromString(item)
        return proto

    def function(self, function: Function) -> onnx.FunctionProto:
        proto = _make(
            onnx.FunctionProto, name=function.name, domain=function.domain, overload=function.overload,
            doc_string=function.doc_string, attribute=function.attributes,
            input=[v.name for v in function.graph.inputs], output=[v.name for v in function.graph.outputs],
        )
        proto.attribute_proto.extend(self.attr(a) for a in function.attribute_defaults.values())
        _opsets(proto.opset_import, function.opset_imports)
        proto.node.extend(self.node(n) for n in function.graph)
        proto.value_info.extend(self.value_info(v) for v in _typed_intermediates(function.graph))
        _metadata(proto.metadata_props, function.metadata)
        return proto

    # -- graph ---------------------------------------------------------------------
    def graph(self, graph: Graph, initializers: bool = True) -> onnx.GraphProto:
        proto = _make(onnx.GraphProto, name=graph.name, doc_string=graph.doc_string)
        proto.input.extend(self.value_info(v) for v in graph.inputs)
        proto.output.extend(self.value_info(v) for v in graph.outputs)
        if initializers:
            proto.initializer.extend(self.tensor(v.const, v.name) for v in graph.initializers.values())
        proto.node.extend(self.node(n) for n in graph)
        proto.value_info.extend(self.value_info(v) for v in _typed_intermediates(graph))
        _metadata(proto.metadata_props, graph.metadata)
        for item in graph.extras.get(14, []):
            proto.quantization_annotation.add().ParseFromString(item)
        return proto

    def node(self, node: Node) -> onnx.NodeProto:
        proto = _make(
            onnx.NodeProto, op_type=node.op_type, domain=node.domain, name=node.name, overload=node.overload,
            doc_string=node.doc_string,
            input=[v.name if v is not None else "" for v in node.inputs],
            output=[v.name for v in node.outputs],
        )
        proto.attribute.extend(self.attr(a) for a in node.attrs.values())
        _metadata(proto.metadata_props, node.metadata)
        return proto

    def attr(self, attr: Attr) -> onnx.AttributeProto:
        proto = _make(onnx.AttributeProto, name=attr.name, type=int(attr.type), doc_string=attr.doc_string)
        if attr.ref_attr_name:
            proto.ref_attr_name = attr.ref_attr_name
            return proto
        _WRITE_ATTR[attr.type](self, proto, attr.value)
        return proto

    def value_info(self, value: Value) -> onnx.ValueInfoProto:
        proto = _make(onnx.ValueInfoProto, name=value.name, doc_string=value.doc_string)
        if value.type is not None:
            proto.type.CopyFrom(type_proto(value.type))
        _metadata(proto.metadata_props, value.metadata)
        return proto

    def tensor(self, tensor: Tensor, name: str | None = None) -> onnx.TensorProto:
        if self.sink is not None and wants_external(tensor):
            proto = self.sink.add(tensor)
        else:
            proto = tensor.to_proto()
        if name is not None and proto.name != name:
            proto = _renamed(proto, name)
        return proto

    # -- streamed initializers -------------------------------------------------------
    def initializer_pieces(self, value: Value) -> list[Piece]:
        """One top-level initializer as wire pieces: header bytes, then raw data streamed."""
        tensor = value.const
        length = tensor.raw_length()
        if length is None or self.sink is not None and wants_external(tensor):
            data = self.tensor(tensor, value.name).SerializeToString()
            return [Piece(len(data), data=data)]
        header = tensor.header()
        header.name = value.name
        head = header.SerializeToString() + field_header(TENSOR_RAW_DATA, length)
        return [Piece(len(head), data=head), Piece(length, write=tensor.write_raw)]


def _write_each(field: str, convert=None):
    def write(exporter: Exporter, proto: onnx.AttributeProto, values) -> None:
        container = getattr(proto, field)
        for item in values:
            if convert is None:
                container.add().ParseFromString(item)
            else:
                container.append(convert(exporter, item))
    return write


def _set(field: str, convert=lambda _, v: v):
    def write(exporter: Exporter, proto: onnx.AttributeProto, value) -> None:
        setattr(proto, field, convert(exporter, value))
    return write


def _copy(field: str, convert):
    def write(exporter: Exporter, proto: onnx.AttributeProto, value) -> None:
        getattr(proto, field).CopyFrom(convert(exporter, value))
    return write


def _encode(_, text: str) -> bytes:
    return text.encode("utf-8", _STR)


# How each attribute kind is written (the inverse of the importer's table).
_WRITE_ATTR = {
    AttrType.FLOAT: _set("f"),
    AttrType.INT: _set("i"),
    AttrType.STRING: _set("s", _encode),
    AttrType.TENSOR: _copy("t", Exporter.tensor),
    AttrType.GRAPH: _copy("g", Exporter.graph),
    AttrType.FLOATS: lambda _, proto, v: proto.floats.extend(v),
    AttrType.INTS: lambda _, proto, v: proto.ints.extend(v),
    AttrType.STRINGS: _write_each("strings", _encode),
    AttrType.TENSORS: _write_each("tensors", Exporter.tensor),
    AttrType.GRAPHS: _write_each("graphs", Exporter.graph),
    AttrType.SPARSE_TENSOR: lambda _, proto, v: proto.sparse_tensor.ParseFromString(v),
    AttrType.SPARSE_TENSORS: _write_each("sparse_tensors"),
    AttrType.TYPE_PROTO: lambda _, proto, v: proto.tp.ParseFromString(v),
    AttrType.TYPE_PROTOS: _write_each("type_protos"),
}


def _make(cls, **fields):
    """A proto with only the non-default fields set: ONNX protos are proto2, so an
    explicitly set empty string would show up as a present field."""
    return cls(**{k: v for k, v in fields.items() if v})


def type_proto(value_type: ValueType) -> onnx.TypeProto:
    proto = onnx.TypeProto()
    if isinstance(value_type, TensorType):
        proto.tensor_type.elem_type = value_type.elem_type
        if value_type.shape is not None:
            shape = proto.tensor_type.shape
            shape.SetInParent()
            for dim in value_type.shape:
                entry = shape.dim.add()
                if isinstance(dim, int):
                    entry.dim_value = dim
                elif isinstance(dim, str):
                    entry.dim_param = dim
    elif isinstance(value_type, SequenceType | OptionalType):
        inner = proto.sequence_type if isinstance(value_type, SequenceType) else proto.optional_type
        inner.SetInParent()
        if value_type.elem is not None:
            inner.elem_type.CopyFrom(type_proto(value_type.elem))
    elif isinstance(value_type, OpaqueType):
        proto.ParseFromString(value_type.serialized)
    return proto


def uses_external_source(model: Model) -> bool:
    """Whether any initializer came from an external-data file (so the output keeps that form)."""
    return any(isinstance(v.const, SourceTensor) and v.const.source.external
               for g in model.graphs() for v in g.initializers.values())


def total_weight_bytes(model: Model) -> int:
    return sum(v.const.size * v.const.dtype.itemsize for g in model.graphs() for v in g.initializers.values())


def data_file_name(path: str) -> str:
    return os.path.basename(path) + ".data"


def _typed_intermediates(graph: Graph) -> list[Value]:
    """Values to describe in value_info: typed node outputs, plus anything the source declared there."""
    declared = [v for v in graph.values() if v.in_value_info and v.producer is None and not v.is_graph_input()]
    produced = [out for node in graph for out in node.outputs
                if out.name and (out.type is not None or out.metadata or out.in_value_info)]
    return [v for v in declared + produced if not v.is_graph_output()]


def _opsets(container, opsets: dict[str, int]) -> None:
    for domain, version in opsets.items():
        container.append(_make(onnx.OperatorSetIdProto, domain=domain, version=version))


def _metadata(container, props: dict[str, str]) -> None:
    for key, value in props.items():
        container.add(key=key, value=value)


def _renamed(proto: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(proto)
    copy.name = name
    return copy
