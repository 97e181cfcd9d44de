"""Size of a saved ONNX model: nodes at the top level and in all subgraphs, bytes on disk with external data.

Counts come from the file (loaded without its external data), so every tool's output is measured the
same way whatever library wrote it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx


@dataclass
class ModelStats:
    """``nodes``: main graph only; ``nodes_total``: plus every If/Loop/Scan body, recursively;
    ``function_nodes``: nodes inside model-local functions (not counted in the two above)."""

    nodes: int
    nodes_total: int
    functions: int
    function_nodes: int
    initializers: int
    file_bytes: int
    op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def count_nodes(graph: onnx.GraphProto, ops: Counter[str] | None = None) -> int:
    """Nodes of ``graph`` including those of its subgraphs, optionally tallying ``domain::op`` types."""
    total = 0
    for node in graph.node:
        total += 1
        if ops is not None:
            ops[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
        total += sum(count_nodes(g, ops) for g in subgraphs(node))
    return total


def external_files(model: onnx.ModelProto) -> set[str]:
    """Relative locations of the external data files the model's tensors point at."""
    found: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                found.update(e.value for e in tensor.external_data if e.key == "location")
        for node in graph.node:
            for sub in subgraphs(node):
                visit(sub)

    visit(model.graph)
    return found


def file_bytes(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> int:
    """Bytes of the model file plus the external data files it references."""
    path = Path(path)
    model = model if model is not None else onnx.load(str(path), load_external_data=False)
    extra = (path.parent / name for name in external_files(model))
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


def model_stats(path: str | os.PathLike) -> ModelStats:
    """Node counts and size of the model saved at ``path``."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    ops: Counter[str] = Counter()
    total = count_nodes(model.graph, ops)
    return ModelStats(
        nodes=len(model.graph.node),
        nodes_total=total,
        functions=len(model.functions),
        function_nodes=sum(len(f.node) for f in model.functions),
        initializers=len(model.graph.initializer),
        file_bytes=file_bytes(path, model),
        op_types=dict(sorted(ops.items())),
    )
