"""The narrowest float type each graph output is computed through.

A model that computes in float16 and returns float32 (float16 inside, float32 at the interface, as
mixed-precision converters write them) carries float16 rounding in its float32 outputs. Two
equivalent graphs round at different points (onnxruntime's CPU provider also runs some float16 ops
in float32 and skips the rounding between them), so such outputs may differ by float16 noise, and
judging them by float32's tolerance calls a lossless rewrite a mismatch. Each output is therefore
judged by the tolerance of the float type with the largest epsilon that any value its computation
reads is declared as: graph inputs, initializers, Constant nodes, Cast targets and value_info.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from graphopt.onnx_io.signature import DTYPE_ATTRIBUTES
from graphopt.onnx_io.walk import graphs_within, node_reads, subgraphs

from .bisect import topological_order
from .compare import is_float_dtype


def computed_in(proto: onnx.ModelProto) -> dict[str, np.dtype]:
    """Graph output name -> the float dtype with the largest epsilon its computation passes through."""
    graph = proto.graph
    loosest: dict[str, float] = {}  # value name -> largest eps among the float types it is computed from
    dtypes: dict[float, np.dtype] = {}

    def eps_of(elem_type: int) -> float:
        if not elem_type:
            return 0.0
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        except (KeyError, TypeError, ValueError):
            return 0.0
        if not is_float_dtype(dtype):
            return 0.0
        eps = float(ml_dtypes.finfo(dtype).eps)
        dtypes.setdefault(eps, dtype)
        return eps

    for value in (*graph.input, *graph.value_info):
        loosest[value.name] = eps_of(value.type.tensor_type.elem_type)
    for tensor in graph.initializer:
        loosest[tensor.name] = eps_of(tensor.data_type)
    for index in topological_order(graph):
        node = graph.node[index]
        eps = max((loosest.get(name, 0.0) for name in node_reads(node)), default=0.0)
        eps = max(eps, _declared(node, eps_of))
        for out in node.output:
            loosest[out] = max(eps, loosest.get(out, 0.0))
    out = {}
    for value in graph.output:
        own = eps_of(value.type.tensor_type.elem_type)
        eps = loosest.get(value.name, 0.0)
        if own and eps > own:
            out[value.name] = dtypes[eps]
    return out


def _declared(node: onnx.NodeProto, eps_of) -> float:
    """The largest float epsilon a node declares (a Cast target, a Constant's tensor), with what the graphs
    its attributes hold declare (their initializers and nodes)."""
    nested = [g for sub in subgraphs(node) for g in graphs_within(sub)]
    return max((*_attribute_eps(node, eps_of), *(eps_of(t.data_type) for g in nested for t in g.initializer),
                *(eps for g in nested for inner in g.node for eps in _attribute_eps(inner, eps_of))), default=0.0)


def _attribute_eps(node: onnx.NodeProto, eps_of) -> Iterator[float]:
    for attr in node.attribute:
        if attr.name in DTYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT:
            yield eps_of(attr.i)
        elif attr.type == onnx.AttributeProto.TENSOR:
            yield eps_of(attr.t.data_type)
