"""Shape inference into the IR (onnx's inference, with data propagation), without the weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx

from .ir import Model, TensorType, Value
from .onnx_io import to_proto_without_weights
from .onnx_io.importer import Importer

log = logging.getLogger(__name__)


def infer_shapes(model: Model) -> int:
    """Fill in value types that are missing or less specific than inferred; returns how many changed.

    Runs on a copy of the model whose large weights are typed inputs, so memory
    stays proportional to the graph, not the file. Failures of onnx's inference
    (unknown ops, inconsistent models) leave the model as it was.
    """
    proto = to_proto_without_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as err:  # noqa: BLE001 - onnx raises many types; inference is best effort
        log.warning("shape inference failed: %s", err)
        return 0
    by_name: dict[str, Value] = {v.name: v for g in model.graph.walk_graphs() for v in g.values()}
    importer = Importer(None)
    filled = 0
    for info in _all_value_infos(inferred.graph):
        value = by_name.get(info.name)
        if value is None:
            continue
        new_type = importer.value_type(info.type)
        if new_type is not None and _more_specific(new_type, value.type):
            value.type = new_type
            filled += 1
    return filled


def _known_dims(t: TensorType) -> int:
    return -1 if t.shape is None else sum(d is not None for d in t.shape)


def _more_specific(new, old) -> bool:
    if old is None:
        return True
    if not isinstance(new, TensorType) or not isinstance(old, TensorType) or new.elem_type != old.elem_type:
        return False
    if old.shape is not None and new.shape is not None and len(old.shape) != len(new.shape):
        return False
    return _known_dims(new) > _known_dims(old)


def _all_value_infos(graph: onnx.GraphProto):
    yield from graph.value_info
    yield from graph.output
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_value_infos(sub)


def static_shape(value: Value, bindings: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
    """The value's shape with symbolic dims bound (default 1), or None if the rank or a dim is unknown."""
    if not isinstance(value.type, TensorType) or value.type.shape is None:
        return None
    dims = []
    for dim in value.type.shape:
        if isinstance(dim, str):
            dim = (bindings or {}).get(dim, 1)
        if dim is None:
            return None
        dims.append(int(dim))
    return tuple(dims)
