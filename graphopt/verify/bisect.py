"""Find the first node whose output differs between two models.

Values that both models produce under the same name (outputs of top-level
nodes; values inside If/Loop bodies are skipped) are exposed as extra graph
outputs, both models run once on the same inputs, and the values are compared
in the topological order of the ORIGINAL graph with the same rule as the
graph outputs. The first one that differs names the node to look at. Large
graphs are exposed in chunks, which bounds memory and stops early.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.onnx_io.walk import node_reads
from graphopt.verify.compare import OutputDiff, compare_values
from graphopt.verify.runtime import LoadedModel, ModelLike, load_model, open_session, run_session

logger = logging.getLogger(__name__)

BISECT_CHUNK = 512  # values exposed per run: enough for most models in one run, bounded memory


@dataclass
class Divergence:
    """The first value of the original graph (in topological order) that the candidate does not reproduce."""

    node: str
    op_type: str
    value: str
    verdict: str
    max_abs: float | None
    max_rel: float | None
    detail: str = ""
    candidate_node: str | None = None
    candidate_op_type: str | None = None
    compared: int = 0  # common values compared up to and including this one


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stand-in naming its position for unnamed nodes."""
    return node.name or f"<unnamed {node.op_type} #{index}>"


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Node indices in a topological order that keeps the file's order where it can.

    ONNX requires sorted nodes but not every exporter obeys; values used inside
    subgraphs count as inputs of the node that owns the subgraph.
    """
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    users: dict[int, list[int]] = {}
    indegree = [0] * len(graph.node)
    for i, node in enumerate(graph.node):
        for dep in {producer[name] for name in node_reads(node) if name in producer} - {i}:
            users.setdefault(dep, []).append(i)
            indegree[i] += 1
    ready = [i for i, d in enumerate(indegree) if d == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, []):
            indegree[user] -= 1
            if indegree[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):
        logger.warning("the original graph has a cycle; bisecting in file order")
        return list(range(len(graph.node)))
    return order


def common_values(original: onnx.GraphProto, candidate: onnx.GraphProto) -> list[tuple[str, int]]:
    """``(value name, original node index)`` of values produced by a node in both graphs.

    In the topological order of ``original``.
    """
    in_candidate = {out for node in candidate.node for out in node.output if out}
    values, seen = [], set()
    for i in topological_order(original):
        for out in original.node[i].output:
            if out and out in in_candidate and out not in seen:
                seen.add(out)
                values.append((out, i))
    return values


def find_divergence(
    original: ModelLike | LoadedModel,
    candidate: ModelLike | LoadedModel,
    original_inputs: Mapping[str, np.ndarray],
    candidate_inputs: Mapping[str, np.ndarray],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    noise: float | None = None,
    chunk_size: int = BISECT_CHUNK,
) -> tuple[Divergence | None, int]:
    """The first diverging shared value (see the module docstring), and how many were compared.

    Runs ``ceil(shared values / chunk_size)`` times at most, stopping at the
    first chunk that holds a divergence.
    """
    original, candidate = load_model(original), load_model(candidate)
    values = common_values(original.proto.graph, candidate.proto.graph)
    logger.debug("bisecting over %d shared values", len(values))
    compared = 0
    for start in range(0, len(values), chunk_size):
        chunk = values[start : start + chunk_size]
        names = [name for name, _ in chunk]
        ref = _run_exposing(original, original_inputs, names, "original")
        got = _run_exposing(candidate, candidate_inputs, names, "candidate")
        for name, index in chunk:
            compared += 1
            diff = compare_values(name, ref[name], got[name], rtol=rtol, atol=atol, noise=noise)
            if not diff.ok:
                return _divergence(original, candidate, index, diff, compared), compared
        del ref, got
    return None, compared


def _divergence(
    original: LoadedModel, candidate: LoadedModel, index: int, diff: OutputDiff, compared: int
) -> Divergence:
    node = original.proto.graph.node[index]
    cand_index, cand_node = next(
        (i, n) for i, n in enumerate(candidate.proto.graph.node) if diff.name in n.output
    )
    return Divergence(
        node=node_label(node, index),
        op_type=node.op_type,
        value=diff.name,
        verdict=diff.verdict,
        max_abs=diff.max_abs,
        max_rel=diff.max_rel,
        detail=diff.detail,
        candidate_node=node_label(cand_node, cand_index),
        candidate_op_type=cand_node.op_type,
        compared=compared,
    )


def _run_exposing(
    model: LoadedModel, inputs: Mapping[str, np.ndarray], names: list[str], label: str
) -> dict[str, object]:
    existing = {o.name for o in model.proto.graph.output}
    extra = [name for name in names if name not in existing]
    with open_session(model, extra, label=f"{label} (with intermediate values exposed)") as sess:
        return run_session(sess, inputs, names, label=f"{label} while bisecting")
