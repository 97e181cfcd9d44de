"""ONNX protobuf -> graphopt IR, checking what a well-formed model must satisfy.

Errors name the node and the value, because "dangling edge" alone does not tell
a user where to look.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from ..errors import GraphStructureError, ModelLoadError
from ..ir.graph import Graph, Node, Value
from ..ir.model import Function, Model
from ..ir.tensor import ArrayTensor, DataSource, ProtoTensor, SourceTensor, Tensor
from ..ir.types import Attr, AttrType, OpaqueType, OptionalType, SequenceType, TensorType, ValueType
from .signature import check_signature

_STR = "surrogateescape"  # any bytes survive a decode/encode round trip


class _Scope:
    """Name -> Value for one graph, falling back to enclosing graphs (outer scope)."""

    def __init__(self, parent: _Scope | None = None) -> None:
        self.names: dict[str, Value] = {}
        self.parent = parent

    def lookup(self, name: str) -> Value | None:
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None


class Importer:
    """Converts protos to IR. ``base_dir`` resolves external data; None forbids it."""

    def __init__(self, base_dir: str | None) -> None:
        self.base_dir = os.path.realpath(base_dir) if base_dir is not None else None
        self._sources: dict[str, DataSource] = {}
        self._opsets: dict[str, int] = {}  # of the model or function being read: nodes are checked against them

    # -- model ---------------------------------------------------------------------
    def model(self, proto: onnx.ModelProto, initializers: list[Tensor] | None = None) -> Model:
        if not proto.HasField("graph"):
            raise ModelLoadError("not an ONNX model: the file has no graph (is it an ONNX file?)")
        opsets = {op.domain: op.version for op in proto.opset_import}
        model = Model(
            graph=Graph(),
            ir_version=proto.ir_version,
            opset_imports=opsets,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata={p.key: p.value for p in proto.metadata_props},
            base_dir=self.base_dir,
        )
        for number, name in ((20, "training_info"), (26, "configuration")):
            items = getattr(proto, name, [])
            if len(items):
                model.extras[number] = [item.SerializeToString() for item in items]
        model.functions = [self.function(f) for f in proto.functions]
        self._opsets = opsets
        model.graph = self.graph(proto.graph, None, initializers)
        return model

    def function(self, proto: onnx.FunctionProto) -> Function:
        scope = _Scope()
        inputs = [self._define(scope, Value(name), f"function {proto.name}") for name in proto.input]
        graph = Graph(proto.name, inputs=inputs, doc_string=proto.doc_string)
        self._opsets = {op.domain: op.version for op in proto.opset_import}
        self._nodes(graph, proto.node, scope)
        self._value_info(scope, proto.value_info)
        where = f"output of function {proto.name!r}"
        graph.outputs = [self._resolve(scope, name, where) for name in proto.output]
        function = Function(
            domain=proto.domain,
            name=proto.name,
            graph=graph,
            attributes=list(proto.attribute),
            attribute_defaults={a.name: self.attr(a, scope) for a in proto.attribute_proto},
            opset_imports={op.domain: op.version for op in proto.opset_import},
            overload=proto.overload,
            doc_string=proto.doc_string,
            metadata={p.key: p.value for p in proto.metadata_props},
        )
        return function

    # -- graph ---------------------------------------------------------------------
    def graph(self, proto: onnx.GraphProto, outer: _Scope | None,
              initializers: list[Tensor] | None = None) -> Graph:
        scope = _Scope(outer)
        graph = Graph(proto.name, doc_string=proto.doc_string)
        graph.metadata = {p.key: p.value for p in proto.metadata_props}
        if len(proto.quantization_annotation):
            graph.extras[14] = [a.SerializeToString() for a in proto.quantization_annotation]
        for vi in proto.input:
            value = self._define(scope, Value(vi.name, self.value_type(vi.type)), f"graph {graph.name!r}")
            _describe(value, vi)
            graph.add_input(value)
        tensors = initializers if initializers is not None else [self.tensor(t) for t in proto.initializer]
        tensors = tensors + [self.sparse_tensor(t) for t in proto.sparse_initializer]
        for tensor in tensors:
            value = scope.names.get(tensor.name)
            if value is None or value.const is not None:
                value = self._define(scope, Value(tensor.name), "initializers")
            value.const = tensor
            if value.type is None:
                value.type = TensorType(tensor.elem_type, tensor.shape)
            graph.add_initializer(value)
        self._nodes(graph, proto.node, scope)
        for value in graph.initializers.values():
            if problem := value.const.data_problem():
                readers = [user.label() for user in value.users()]
                raise ModelLoadError(f"initializer {value.name!r} {problem}", node=readers[0] if readers else None)
        self._value_info(scope, proto.value_info)
        for vi in proto.output:
            value = self._resolve(scope, vi.name, f"output of graph {graph.name!r}")
            declared = self.value_type(vi.type)
            if declared is not None:
                value.type = declared
            _describe(value, vi)
            graph.outputs.append(value)
        if not _is_topological(graph):
            graph.toposort()
        return graph

    def _nodes(self, graph: Graph, protos, scope: _Scope) -> None:
        pairs = []
        for proto in protos:
            node = Node(proto.op_type, outputs=list(proto.output), domain=proto.domain, name=proto.name,
                        overload=proto.overload, doc_string=proto.doc_string)
            node.metadata = {p.key: p.value for p in proto.metadata_props}
            for out in node.outputs:
                if out.name:
                    self._define(scope, out, f"node {node.label()!r}")
            graph.append(node)
            pairs.append((node, proto))
        for node, proto in pairs:
            node.set_inputs([
                self._resolve(scope, name, f"input of node {node.label()!r}") if name else None
                for name in proto.input
            ])
            for attr in proto.attribute:
                node.set_attr(attr.name, self.attr(attr, scope))
                if isinstance(value := node.attrs[attr.name].value, Tensor) and (problem := value.data_problem()):
                    raise ModelLoadError(f"attribute {attr.name!r} {problem}", node=node.label())
            check_signature(node, self._opsets)

    def _value_info(self, scope: _Scope, infos) -> None:
        for vi in infos:
            value = scope.names.get(vi.name)
            if value is None:
                continue  # stale entry for a value that no longer exists
            value.type = self.value_type(vi.type) or value.type
            value.in_value_info = True
            _describe(value, vi)

    @staticmethod
    def _define(scope: _Scope, value: Value, where: str) -> Value:
        previous = scope.names.get(value.name)
        if previous is not None:
            first = previous.producer.label() if previous.producer else "a graph input or initializer"
            raise GraphStructureError(
                f"duplicate value name {value.name!r}: defined by {first} and again by {where}",
                hint="every value in an ONNX graph must have exactly one producer",
            )
        scope.names[value.name] = value
        return value

    @staticmethod
    def _resolve(scope: _Scope, name: str, where: str) -> Value:
        value = scope.lookup(name)
        if value is None:
            raise GraphStructureError(
                f"dangling edge: {where} reads {name!r}, which no node, graph input or initializer produces",
                hint="the model is incomplete or was edited by hand; re-export it",
            )
        return value

    # -- attributes, types, tensors -------------------------------------------------
    def attr(self, proto: onnx.AttributeProto, scope: _Scope) -> Attr:
        kind = AttrType(proto.type)
        attr = Attr(proto.name, kind, doc_string=proto.doc_string, ref_attr_name=proto.ref_attr_name)
        if proto.ref_attr_name:
            return attr
        read = _READ_ATTR.get(kind)
        if read is None:
            raise ModelLoadError(f"attribute {proto.name!r} has an undefined type")
        attr.value = read(self, proto, scope)
        return attr

    def value_type(self, proto: onnx.TypeProto) -> ValueType | None:
        kind = proto.WhichOneof("value")
        if kind is None:
            return None
        if kind == "tensor_type":
            tt = proto.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = tuple(_dim(d) for d in tt.shape.dim)
            return TensorType(tt.elem_type, shape)
        if kind == "sequence_type":
            return SequenceType(self.value_type(proto.sequence_type.elem_type))
        if kind == "optional_type":
            return OptionalType(self.value_type(proto.optional_type.elem_type))
        return OpaqueType(proto.SerializeToString())

    def tensor(self, proto: onnx.TensorProto) -> Tensor:
        """A lazy tensor; external data is resolved (and checked) against ``base_dir``."""
        if proto.data_location != onnx.TensorProto.EXTERNAL:
            return ProtoTensor(proto)
        info = {e.key: e.value for e in proto.external_data}
        where = f"initializer {proto.name!r}"
        location = info.get("location", "")
        if self.base_dir is None:
            raise ModelLoadError(f"{where} uses external data ({location!r}) but the model was not loaded "
                                 "from a file; pass base_dir or load it from its path")
        if not location or os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
            raise ModelLoadError(f"{where}: external data location {location!r} escapes the model's folder",
                                 hint="locations must be relative paths inside the model's folder")
        path = os.path.realpath(os.path.join(self.base_dir, location))
        if os.path.commonpath([path, self.base_dir]) != self.base_dir:
            raise ModelLoadError(f"{where}: external data location {location!r} escapes the model's folder")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{where}: external data file {location!r} is missing next to the model",
                                 hint=f"expected it at {path}")
        if path not in self._sources:
            self._sources[path] = DataSource(path=path, external=True)
        source = self._sources[path]
        offset = int(info.get("offset", 0))
        size = source.size()
        length = int(info["length"]) if "length" in info else size - offset
        if offset + length > size:
            raise ModelLoadError(f"{where}: external data {location!r} is truncated "
                                 f"(needs bytes {offset}..{offset + length}, file has {size})")
        header = onnx.TensorProto(name=proto.name, data_type=proto.data_type, dims=proto.dims,
                                  doc_string=proto.doc_string)
        return SourceTensor(header, source, offset, length)

    def sparse_tensor(self, proto: onnx.SparseTensorProto) -> Tensor:
        """Sparse initializers are densified: every runtime consumes them as dense tensors anyway."""
        values = self.tensor(proto.values).numpy()
        indices = self.tensor(proto.indices).numpy()
        dense = np.zeros(tuple(proto.dims), dtype=values.dtype)
        flat_index = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, dense.shape)
        dense.reshape(-1)[flat_index] = values
        return ArrayTensor(dense, proto.values.name, proto.values.data_type)


def _describe(value: Value, info: onnx.ValueInfoProto) -> None:
    """Doc string and metadata of a ValueInfoProto onto its value (where there are any)."""
    value.doc_string = info.doc_string or value.doc_string
    value.metadata.update((p.key, p.value) for p in info.metadata_props)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", _STR)


# How each attribute kind is read (the exporter holds the inverse table).
_READ_ATTR = {
    AttrType.FLOAT: lambda imp, p, scope: p.f,
    AttrType.INT: lambda imp, p, scope: p.i,
    AttrType.STRING: lambda imp, p, scope: _decode(p.s),
    AttrType.TENSOR: lambda imp, p, scope: imp.tensor(p.t),
    AttrType.GRAPH: lambda imp, p, scope: imp.graph(p.g, scope),
    AttrType.FLOATS: lambda imp, p, scope: list(p.floats),
    AttrType.INTS: lambda imp, p, scope: list(p.ints),
    AttrType.STRINGS: lambda imp, p, scope: [_decode(s) for s in p.strings],
    AttrType.TENSORS: lambda imp, p, scope: [imp.tensor(t) for t in p.tensors],
    AttrType.GRAPHS: lambda imp, p, scope: [imp.graph(g, scope) for g in p.graphs],
    AttrType.SPARSE_TENSOR: lambda imp, p, scope: p.sparse_tensor.SerializeToString(),
    AttrType.SPARSE_TENSORS: lambda imp, p, scope: [t.SerializeToString() for t in p.sparse_tensors],
    AttrType.TYPE_PROTO: lambda imp, p, scope: p.tp.SerializeToString(),
    AttrType.TYPE_PROTOS: lambda imp, p, scope: [t.SerializeToString() for t in p.type_protos],
}


def _dim(d: onnx.TensorShapeProto.Dimension):
    if d.HasField("dim_value"):
        return d.dim_value
    return d.dim_param if d.HasField("dim_param") else None


def _is_topological(graph: Graph) -> bool:
    seen: set[int] = set()
    for node in graph:
        for value in list(node.inputs) + node.implicit_inputs():
            if value is not None and value.producer is not None and value.producer.graph is graph:
                if id(value.producer) not in seen:
                    return False
        seen.add(id(node))
    return True
