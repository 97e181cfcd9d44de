"""Physically remove the chosen channels: slice weights, shrink value shapes, fix attributes.

Nothing is masked: every initializer along a pruned dim is replaced by a
smaller copy, every intermediate value's type gets its new size, and the few
ops whose attributes or shape inputs spell out a channel count are rewritten
(a depthwise conv's ``group``, a Reshape target, Split sizes, Slice bounds,
GroupNorm's ``num_groups``). Shape constants that other nodes share are copied
before they are changed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from graphopt.ir import ArrayTensor, Graph, Node, TensorType, Value

from .groups import Analysis, DimKey
from .layout import slice_params, target_piece

log = logging.getLogger(__name__)


def kept_indices(analysis: Analysis, removal: Mapping[int, np.ndarray]) -> dict[DimKey, np.ndarray]:
    """Per pruned dim, the original indices that stay (sorted)."""
    dropped: dict[DimKey, np.ndarray] = {}
    for group in analysis.groups:
        atoms = removal.get(group.id)
        if atoms is None or not len(atoms):
            continue
        for key in group.dims:
            mask = np.isin(group.pos[key], atoms)
            dropped[key] = dropped[key] | mask if key in dropped else mask
    return {key: np.nonzero(~mask)[0] for key, mask in dropped.items() if mask.any()}


def set_const(value: Value, array: np.ndarray) -> None:
    """Replace an initializer's data in place (same name, new shape)."""
    array = np.require(array, requirements="C")  # (ascontiguousarray makes a 0-d array 1-d)
    value.const = ArrayTensor(array, value.name, value.const.elem_type if value.const is not None else None)
    value.type = TensorType(value.const.elem_type, tuple(array.shape))


def _shrink_type(value: Value, axis: int, size: int) -> None:
    if isinstance(value.type, TensorType) and value.type.shape is not None and axis < len(value.type.shape):
        shape = list(value.type.shape)
        shape[axis] = size
        value.type = TensorType(value.type.elem_type, tuple(shape))


def apply_removal(analysis: Analysis, kept: Mapping[DimKey, np.ndarray]) -> None:
    """Slice constants and shrink types along every pruned dim, then fix the nodes that need it."""
    by_value: dict[str, dict[int, np.ndarray]] = {}
    for (name, axis), idx in kept.items():
        by_value.setdefault(name, {})[axis] = idx
    for name, axes in by_value.items():
        value = analysis.dims[(name, next(iter(axes)))].value
        if value.const is not None:
            array = value.const.numpy()
            for axis, idx in axes.items():
                array = np.take(array, idx, axis=axis)
            set_const(value, array)
        else:
            for axis, idx in axes.items():
                _shrink_type(value, axis, len(idx))
    for node in analysis.fixups.values():
        _fix(analysis, node, kept)


def _new_size(analysis: Analysis, kept: Mapping[DimKey, np.ndarray], value: Value, axis: int) -> int:
    key = (value.name, axis)
    if key in kept:
        return len(kept[key])
    return int(analysis.shapes.static(value)[axis])


def _private_const(graph: Graph, node: Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` its own initializer at input ``index`` (others may share the old one)."""
    old = node.inputs[index]
    value = graph.add_initializer(ArrayTensor(np.asarray(array, dtype=old.const.dtype), graph.fresh_name(old.name)))
    node.set_input(index, value)


def _fix(analysis: Analysis, node: Node, kept: Mapping[DimKey, np.ndarray]) -> None:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):  # depthwise: one group per (kept) input channel
        node.set_attr("group", _new_size(analysis, kept, node.inputs[0], 1))
    elif op == "GroupNormalization":
        old_c = int(analysis.shapes.static(node.inputs[0])[1])
        per = old_c // int(node.attr("num_groups"))
        node.set_attr("num_groups", _new_size(analysis, kept, node.inputs[0], 1) // per)
    elif op == "Split":
        _fix_split(analysis, node, kept)
    elif op == "Slice":
        _fix_slice(analysis, node, kept)
    elif op == "Reshape":
        _fix_reshape(analysis, node, kept)
    else:
        log.debug("no fix-up needed for %s", node.label())


def _fix_split(analysis: Analysis, node: Node, kept) -> None:
    rank = len(analysis.shapes.static(node.inputs[0]))
    axis = int(node.attr("axis", 0)) % rank
    sizes = np.array([_new_size(analysis, kept, out, axis) for out in node.outputs], dtype=np.int64)
    if (analysis.model.opset() or 13) < 13:
        node.set_attr("split", sizes.tolist())
        return
    node.attrs.pop("num_outputs", None)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        _private_const(node.graph, node, 1, sizes)
    else:
        value = node.graph.add_initializer(ArrayTensor(sizes, node.graph.fresh_name("split_sizes")))
        node.set_inputs([node.inputs[0], value])


def _fix_slice(analysis: Analysis, node: Node, kept) -> None:
    x = node.inputs[0]
    rank = len(analysis.shapes.static(x))
    from .rules import NodeView

    params = slice_params(NodeView(node, analysis.shapes), rank)
    starts, ends = [], []
    for axis, (start, end, _step) in params.items():
        key = (x.name, axis)
        size = int(analysis.shapes.static(x)[axis]) if analysis.shapes.static(x)[axis] is not None else None
        if key in kept and size is not None:
            window = np.arange(size)[start:end]
            idx = kept[key]
            new_start = int(np.searchsorted(idx, window[0])) if len(window) else 0
            start, end = new_start, new_start + int(np.isin(idx, window).sum())
        starts.append(start)
        ends.append(end)
    if len(node.inputs) == 1:
        node.set_attr("starts", starts)
        node.set_attr("ends", ends)
        return
    _private_const(node.graph, node, 1, np.array(starts, dtype=np.int64))
    _private_const(node.graph, node, 2, np.array(ends, dtype=np.int64))
    if len(node.inputs) < 4 or node.inputs[3] is None:  # axes were implicit: make them explicit
        axes = node.graph.add_initializer(ArrayTensor(np.array(list(params), np.int64), node.graph.fresh_name("axes")))
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        inputs[3] = axes
        node.set_inputs(inputs)


def _fix_reshape(analysis: Analysis, node: Node, kept) -> None:
    out = node.outputs[0]
    changes = {axis: len(idx) for (name, axis), idx in kept.items() if name == out.name}
    if not changes:
        return
    shape_value = node.inputs[1]
    if shape_value.const is not None:
        target = shape_value.const.numpy().astype(np.int64).copy()
        for axis, size in changes.items():
            if target[axis] > 0:
                target[axis] = size
        _private_const(node.graph, node, 1, target)
        return
    concat = shape_value.producer  # a Concat whose piece holding each changed entry is constant (the rule)
    for axis, size in changes.items():
        index, offset = target_piece(concat, axis, analysis.shapes.static)
        entries = concat.inputs[index].const.numpy().copy()
        if int(entries.reshape(-1)[offset]) > 0:
            entries.reshape(-1)[offset] = size
            _private_const(concat.graph, concat, index, entries)
