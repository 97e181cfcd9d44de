"""MACs and parameter counts of a model, before or after a (planned) pruning.

Counted on probe A's shapes (symbolic dims at batch 1, other names at 8, or as
bound by the caller) with the planned removals subtracted, so the FLOPs target
can be searched without touching the graph. Only Conv, ConvTranspose, Gemm and
MatMul count: they are where the multiply-accumulates are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from graphopt.ir import Node, Value

from .groups import WEIGHTED, Analysis, DimKey

Removed = Mapping[DimKey, float]  # elements removed per dim (fractional while planning)


def _size(analysis: Analysis, value: Value | None, removed: Removed) -> list[float] | None:
    if value is None:
        return None
    shape = analysis.shapes.concrete(value)
    if shape is None:
        return None
    return [d - removed.get((value.name, axis), 0.0) for axis, d in enumerate(shape)]


def node_macs(analysis: Analysis, node: Node, removed: Removed) -> float:
    """Multiply-accumulates of one weighted node (0 for other ops or unknown shapes)."""
    if node.op_type not in WEIGHTED or len(node.inputs) < 2:
        return 0.0
    x, w = _size(analysis, node.inputs[0], removed), _size(analysis, node.inputs[1], removed)
    y = _size(analysis, node.outputs[0], removed)
    if x is None or w is None or y is None:
        return 0.0
    if node.op_type == "Conv":
        return y[0] * math.prod(y[2:]) * math.prod(w)
    if node.op_type == "ConvTranspose":
        return x[0] * math.prod(x[2:]) * math.prod(w)
    if node.op_type == "Gemm":
        rows = x[1] if node.attr("transA", 0) else x[0]
        return rows * math.prod(w)
    return math.prod(y) * x[-1]


def model_cost(analysis: Analysis, removed: Removed) -> tuple[float, float]:
    """(MACs, params) of the main graph with ``removed`` elements taken out."""
    macs = sum(node_macs(analysis, node, removed) for node in analysis.model.graph)
    params = 0.0
    for value in analysis.model.graph.initializers.values():
        size = _size(analysis, value, removed)
        params += math.prod(size) if size else 1.0
    return macs, params


def group_nodes(analysis: Analysis, dims: list[DimKey]) -> list[Node]:
    """The weighted nodes whose weights or channels a group's dims touch."""
    seen: dict[int, Node] = {}
    for key in dims:
        for node, _ in analysis.dims[key].roles:
            if node.op_type in WEIGHTED:
                seen.setdefault(id(node), node)
    return list(seen.values())


def group_cost(analysis: Analysis, dims: list[DimKey], removed: Removed) -> tuple[float, float]:
    """(MACs, params) of the layers and constants a group touches, under ``removed``."""
    macs = sum(node_macs(analysis, node, removed) for node in group_nodes(analysis, dims))
    params, counted = 0.0, set()
    for key in dims:
        value = analysis.dims[key].value
        if value.const is not None and value.name not in counted:
            counted.add(value.name)
            params += math.prod(_size(analysis, value, removed) or [1.0])
    return macs, params
