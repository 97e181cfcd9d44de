"""Value types and node attributes of the IR (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .graph import Graph

Dim = int | str | None
"""A dimension: a known size, a symbolic name (ONNX dim_param), or unknown."""


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type (ONNX TensorProto.DataType) and shape.

    ``shape is None`` means the rank is unknown; a ``None`` dim means that one
    dimension is unknown.
    """

    elem_type: int
    shape: tuple[Dim, ...] | None = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


@dataclass(frozen=True)
class SequenceType:
    elem: ValueType | None


@dataclass(frozen=True)
class OptionalType:
    elem: ValueType | None


@dataclass(frozen=True)
class OpaqueType:
    """A type graphopt does not model (map, sparse tensor, ...), kept as serialized bytes."""

    serialized: bytes


ValueType = TensorType | SequenceType | OptionalType | OpaqueType


class AttrType(enum.IntEnum):
    """Mirrors onnx.AttributeProto.AttributeType."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    SPARSE_TENSOR = 11
    TYPE_PROTO = 13
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSORS = 12
    TYPE_PROTOS = 14


@dataclass
class Attr:
    """A node attribute.

    Values are plain Python: int, float, str (decoded with surrogateescape so any
    bytes survive), lists of those, :class:`Tensor`, :class:`Graph`, lists of
    graphs; kinds graphopt does not model (sparse tensors, type protos) keep
    their serialized bytes. ``ref_attr_name`` marks a reference to an attribute
    of the enclosing function.
    """

    name: str
    type: AttrType
    value: Any = None
    doc_string: str = ""
    ref_attr_name: str = ""

    def graphs(self) -> list[Graph]:
        """The subgraphs this attribute holds (empty for non-graph attributes)."""
        if self.type == AttrType.GRAPH:
            return [self.value]
        if self.type == AttrType.GRAPHS:
            return list(self.value)
        return []

    @staticmethod
    def infer(name: str, value: Any) -> Attr:
        """Build an attribute, inferring its type from a Python value (for passes)."""
        from .graph import Graph
        from .tensor import Tensor

        scalar = {bool: AttrType.INT, int: AttrType.INT, float: AttrType.FLOAT, str: AttrType.STRING}
        for py, kind in scalar.items():
            if isinstance(value, py):
                return Attr(name, kind, int(value) if py is bool else value)
        if isinstance(value, Tensor):
            return Attr(name, AttrType.TENSOR, value)
        if isinstance(value, Graph):
            return Attr(name, AttrType.GRAPH, value)
        if isinstance(value, list | tuple):
            items = list(value)
            if all(isinstance(v, int) for v in items):
                return Attr(name, AttrType.INTS, [int(v) for v in items])
            if all(isinstance(v, int | float) for v in items):
                return Attr(name, AttrType.FLOATS, [float(v) for v in items])
            if all(isinstance(v, str) for v in items):
                return Attr(name, AttrType.STRINGS, items)
            if all(isinstance(v, Graph) for v in items):
                return Attr(name, AttrType.GRAPHS, items)
            if all(isinstance(v, Tensor) for v in items):
                return Attr(name, AttrType.TENSORS, items)
        raise TypeError(f"cannot infer the ONNX attribute type of {name}={value!r}")
