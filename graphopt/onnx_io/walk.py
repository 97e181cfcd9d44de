"""Walks over ONNX protos that reach into subgraphs (If/Loop/Scan bodies, which attributes hold)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold (an If's branches, a Loop's or Scan's body)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else attr.graphs)]


def graphs_within(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from graphs_within(sub)


def node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every value name the node reads, those its subgraphs' nodes read included (outer-scope reads)."""
    yield from node.input
    for sub in subgraphs(node):
        for inner in sub.node:
            yield from node_reads(inner)


def model_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: its graphs', nested ones included, and its local functions'."""
    for graph in graphs_within(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node
