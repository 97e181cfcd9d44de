"""What is in a model: the numbers ``graphopt inspect`` prints."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .errors import GraphoptError
from .ir import Model, Node, TensorType
from .shapes import infer_shapes, static_shape


@dataclass
class ValueSummary:
    name: str
    dtype: str
    shape: list | None


@dataclass
class ModelSummary:
    ir_version: int
    opsets: dict[str, int]
    producer: str
    nodes: int
    nodes_in_subgraphs: int
    subgraphs: int
    functions: int
    ops: dict[str, int]
    params: int
    param_bytes: int
    initializers: int
    inputs: list[ValueSummary] = field(default_factory=list)
    outputs: list[ValueSummary] = field(default_factory=list)
    macs: int | None = None
    macs_by_op: dict[str, int] = field(default_factory=dict)
    file_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: Model, shapes: Mapping[str, int] | None = None) -> ModelSummary:
    """Counts, sizes and estimated MACs (Conv/ConvTranspose/MatMul/Gemm; symbolic dims bound by
    ``shapes`` — a dim_param name to size map — or 1)."""
    infer_shapes(model)
    graphs = list(model.graphs())
    named = {d for g in graphs for v in g.values() if v.shape for d in v.shape if isinstance(d, str)}
    if unknown := sorted(set(shapes or ()) - named):  # a misspelt dim would leave the MACs at dim = 1, silently
        known = ", ".join(sorted(named)) or "none: every dim is static"
        raise GraphoptError(f"the model has no symbolic dim {unknown[0]!r}", hint=f"its symbolic dims: {known}")
    ops = Counter(n.qualified_op for g in graphs for n in g)
    weights = [v.const for g in graphs for v in g.initializers.values()]
    macs_by_op: Counter[str] = Counter()
    for graph in graphs:
        for node in graph:
            macs = node_macs(node, shapes)
            if macs:
                macs_by_op[node.op_type] += macs
    file_bytes = None
    if model.source_path:
        file_bytes = os.path.getsize(model.source_path)
    return ModelSummary(
        ir_version=model.ir_version,
        opsets={k or "ai.onnx": v for k, v in model.opset_imports.items()},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        nodes=len(model.graph),
        nodes_in_subgraphs=sum(len(g) for g in graphs) - len(model.graph),
        subgraphs=sum(1 for _ in model.graph.walk_graphs()) - 1,
        functions=len(model.functions),
        ops=dict(ops.most_common()),
        params=sum(t.size for t in weights),
        param_bytes=sum(t.size * t.dtype.itemsize for t in weights),
        initializers=len(weights),
        inputs=[_describe(v) for v in model.graph.inputs if not v.is_initializer()],
        outputs=[_describe(v) for v in model.graph.outputs],
        macs=sum(macs_by_op.values()),
        macs_by_op=dict(macs_by_op),
        file_bytes=file_bytes,
    )


def _describe(value) -> ValueSummary:
    import onnx

    if isinstance(value.type, TensorType):
        dtype = onnx.TensorProto.DataType.Name(value.type.elem_type).lower()
        shape = None if value.type.shape is None else ["?" if d is None else d for d in value.type.shape]
        return ValueSummary(value.name, dtype, shape)
    return ValueSummary(value.name, type(value.type).__name__ if value.type else "?", None)


def node_macs(node: Node, shapes: Mapping[str, int] | None = None) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/MatMul/Gemm, None if shapes are unknown."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
        return None
    ins = [static_shape(v, shapes) if v is not None else None for v in node.inputs]
    out = static_shape(node.outputs[0], shapes)
    if len(ins) < 2 or ins[0] is None or ins[1] is None:
        return None
    if node.op_type == "MatMul":
        if out is None:
            return None
        k = ins[0][-1]
        return math.prod(out) * k
    if node.op_type == "Gemm":
        k = ins[0][0] if node.attr("transA", 0) else ins[0][-1]
        n = ins[1][0] if node.attr("transB", 0) else ins[1][-1]
        m = ins[0][-1] if node.attr("transA", 0) else ins[0][0]
        return m * n * k
    weight = ins[1]  # Conv: (M, C/group, k...); ConvTranspose: (C, M/group, k...)
    if node.op_type == "Conv":
        return None if out is None else math.prod(out) * math.prod(weight[1:])
    return math.prod(ins[0]) * math.prod(weight[1:])
