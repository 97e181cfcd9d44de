"""graphopt's graph IR: Value, Node, Graph, Model, with use-def lists kept in sync."""

from .graph import Graph, Node, Value, ValueList
from .model import Function, Model
from .tensor import ArrayTensor, ProtoTensor, SourceTensor, Tensor
from .types import Attr, AttrType, Dim, OpaqueType, OptionalType, SequenceType, TensorType, ValueType
from .wellformed import verify

__all__ = [
    "Attr", "AttrType", "ArrayTensor", "Dim", "Function", "Graph", "Model", "Node", "OpaqueType",
    "OptionalType", "ProtoTensor", "SequenceType", "SourceTensor", "Tensor", "TensorType", "Value",
    "ValueList", "ValueType", "verify",
]
