"""A node's input/output counts and attribute types against its ONNX schema, checked as a model is read.

Passes read inputs by position and attributes by type; a node that breaks its schema (a Reshape without
its shape input, a Constant whose ``value`` is a float) would otherwise fail deep inside one of them.
Ops without a schema at the model's opset (other domains, unknown ops) pass through unchecked.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import onnx

from ..errors import GraphStructureError
from ..ir import Node

#: INT attributes that name an element type, and whether UNDEFINED (0) may stand for "from the other inputs"
DTYPE_ATTRIBUTES = {"to": False, "dtype": False, "output_dtype": True}
_DTYPES = frozenset(onnx.TensorProto.DataType.values())


@functools.lru_cache(maxsize=4096)
def _schema(op_type: str, version: int, domain: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return None


def check_signature(node: Node, opsets: Mapping[str, int]) -> None:
    """Raise GraphStructureError naming the node if it breaks its schema's arity or attribute types."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    version = opsets.get(domain, opsets.get("ai.onnx") if domain == "" else None)
    schema = _schema(node.op_type, version, domain) if version else None
    if schema is None:
        return
    for kind, count, low, high in (("inputs", len(node.inputs), schema.min_input, schema.max_input),
                                   ("outputs", len(node.outputs), schema.min_output, schema.max_output)):
        if not low <= count <= high:
            takes = f"{low}" if low == high else f"{low} to {high}" if high < 2**30 else f"at least {low}"
            raise GraphStructureError(f"{node.op_type} takes {takes} {kind} at opset {version}, this node has {count}",
                                      node=node.label())
    formals = schema.inputs
    for index, value in enumerate(node.inputs):
        formal = formals[min(index, len(formals) - 1)] if formals else None
        if value is None and formal is not None and formal.option != onnx.defs.OpSchema.FormalParameterOption.Optional:
            raise GraphStructureError(f"input {index} ({formal.name}) of {node.op_type} is empty, but it is not "
                                      "optional", node=node.label())
    for name, attr in node.attrs.items():
        spec = schema.attributes.get(name)
        if spec is None or attr.ref_attr_name:
            continue
        if int(attr.type) != spec.type.value:
            raise GraphStructureError(f"attribute {name!r} of {node.op_type} must be {spec.type.name}, "
                                      f"not {attr.type.name}", node=node.label())
        if name in DTYPE_ATTRIBUTES and (attr.value not in _DTYPES or attr.value == 0 and not DTYPE_ATTRIBUTES[name]):
            raise GraphStructureError(f"attribute {name!r} of {node.op_type} is {attr.value}, not an ONNX element type",
                                      node=node.label())
