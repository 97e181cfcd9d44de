"""Which values are constants, and evaluating many constant nodes at once.

Folding is only as fast as its evaluator: one onnxruntime session per node
costs milliseconds each, which on a 200k-node graph is minutes. So the nodes
to fold are put into ONE small model (their constant inputs as initializers,
every output exposed) and run in one session. onnxruntime is the reference:
the folded values are bit-for-bit what the original model computes at run
time. Where a batch fails (an op or type onnxruntime lacks), it is split in
halves until the failing node is alone, and that node is tried with onnx's
reference evaluator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.ir import AttrType, Graph, Model, Node, Tensor, Value
from graphopt.ir.tensor import ArrayTensor
from graphopt.onnx_io.exporter import Exporter
from graphopt.onnx_io.walk import node_reads

log = logging.getLogger(__name__)

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
# Ops whose outputs are sequences or optionals: they cannot become initializers.
NON_TENSOR_OPS = frozenset({
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SplitToSequence", "Optional",
})
# Quantization boundaries stay: runtimes fuse DequantizeLinear -> op patterns into integer kernels.
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


class ConstantScope:
    """Answers "is this value a constant?" in O(1) for a whole model.

    An initializer that is also a graph input is not a constant: the caller may
    feed another value. Precomputed once, so hot loops never scan input lists.
    """

    def __init__(self, model: Model, graphs: Iterable[Graph] | None = None) -> None:
        self.graph_inputs: set[int] = set()
        self.graph_outputs: set[int] = set()
        for graph in model.graphs() if graphs is None else graphs:
            self.graph_inputs.update(id(v) for v in graph.inputs)
            self.graph_outputs.update(id(v) for v in graph.outputs)
        self._known_ops: dict[tuple[str, str], bool] = {}
        self.model = model

    def is_initializer(self, value: Value | None) -> bool:
        return value is not None and value.const is not None and id(value) not in self.graph_inputs

    def is_output(self, value: Value) -> bool:
        return id(value) in self.graph_outputs

    def constant_tensor(self, value: Value | None) -> Tensor | None:
        """The tensor of an initializer or of a Constant node's output (lifted or not)."""
        if value is None:
            return None
        if self.is_initializer(value):
            return value.const
        node = value.producer
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return constant_node_tensor(node)
        return None

    def is_standard(self, node: Node) -> bool:
        """A standard ONNX op (not a custom domain, not a model-local function)."""
        key = (node.domain, node.op_type)
        known = self._known_ops.get(key)
        if known is None:
            domain = "" if node.domain == "ai.onnx" else node.domain
            known = node.domain in STANDARD_DOMAINS and onnx.defs.has(node.op_type, domain)
            known = known and self.model.function(node) is None
            self._known_ops[key] = known
        return known


def constant_node_tensor(node: Node) -> Tensor | None:
    """The value of a Constant node, for the attribute forms that hold plain tensors."""
    if len(node.attrs) != 1:
        return None
    (attr,) = node.attrs.values()
    if attr.ref_attr_name:
        return None
    value = attr.value
    makers = {
        "value": lambda: value,
        "value_float": lambda: ArrayTensor(np.float32(value)),
        "value_floats": lambda: ArrayTensor(np.asarray(value, dtype=np.float32)),
        "value_int": lambda: ArrayTensor(np.int64(value)),
        "value_ints": lambda: ArrayTensor(np.asarray(value, dtype=np.int64)),
    }
    make = makers.get(attr.name)
    return make() if make else None


_GRAPH_ATTRS = (AttrType.GRAPH, AttrType.GRAPHS)


def has_subgraphs(node: Node) -> bool:
    """``bool(node.subgraphs())`` without building lists (hot loops over 200k nodes)."""
    return bool(node.attrs) and any(a.type in _GRAPH_ATTRS for a in node.attrs.values())


def tensor_bytes(tensor: Tensor) -> int:
    return math.prod(tensor.shape) * tensor.dtype.itemsize


def array_bytes(array: np.ndarray) -> int:
    return int(array.size) * array.dtype.itemsize


def evaluate(model: Model, nodes: Sequence[Node], leaves: dict[str, onnx.TensorProto],
             wanted: Iterable[Value]) -> dict[int, np.ndarray]:
    """Run ``nodes`` (in topological order) on constant ``leaves``; return ``id(value) -> array``
    for the ``wanted`` values that could be computed. Never raises for a node it cannot run."""
    wanted = [v for v in wanted if v.name]
    results: dict[str, np.ndarray] = {}
    exporter = Exporter()
    protos = [exporter.node(n) for n in nodes]
    _evaluate_into(model, nodes, protos, dict(leaves), {v.name for v in wanted}, results)
    return {id(v): results[v.name] for v in wanted if v.name in results}


def _evaluate_into(model: Model, nodes: Sequence[Node], protos: list[onnx.NodeProto],
                   leaves: dict[str, onnx.TensorProto], wanted: set[str], results: dict[str, np.ndarray]) -> None:
    """Evaluate a batch in one session; on failure, bisect so one bad node costs O(log n) sessions."""
    if not nodes:
        return
    outputs = [o for p in protos for o in p.output if o in wanted]
    try:
        results.update(_run_ort(model, protos, leaves, outputs))
        return
    except Exception as err:  # noqa: BLE001 - onnxruntime raises many types; any failure means "not here"
        if len(nodes) == 1:
            log.debug("onnxruntime cannot fold %s (%s); trying the reference evaluator", nodes[0].label(), err)
            results.update(_run_reference(model, protos, leaves, outputs))
            return
    half = len(nodes) // 2
    first: dict[str, np.ndarray] = {}
    inner_wanted = wanted | {o for p in protos[:half] for o in p.output if o}
    _evaluate_into(model, nodes[:half], protos[:half], leaves, inner_wanted, first)
    results.update({k: v for k, v in first.items() if k in wanted})
    more = dict(leaves)
    for name, array in first.items():
        more[name] = _to_proto(array, name)
    _evaluate_into(model, nodes[half:], protos[half:], more, wanted, results)


def _to_proto(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _mini_model(model: Model, protos: list[onnx.NodeProto], leaves: dict[str, onnx.TensorProto],
                outputs: list[str]) -> onnx.ModelProto:
    needed = {i for p in protos for i in node_reads(p)}
    graph = helper.make_graph(
        protos, "fold", [], [helper.make_value_info(name, onnx.TypeProto()) for name in outputs],
        [t for name, t in leaves.items() if name in needed],
    )
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = max(model.ir_version, 7)
    return proto


_SESSION_OPTIONS = None


def _run_ort(model: Model, protos: list[onnx.NodeProto], leaves: dict[str, onnx.TensorProto],
             outputs: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    global _SESSION_OPTIONS
    if _SESSION_OPTIONS is None:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4  # a failed evaluation is handled (the nodes stay); nothing to log
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        _SESSION_OPTIONS = so
    if not outputs:
        return {}
    data = _mini_model(model, protos, leaves, outputs).SerializeToString()
    session = ort.InferenceSession(data, _SESSION_OPTIONS, providers=["CPUExecutionProvider"])
    values = session.run(outputs, {})
    return {name: value for name, value in zip(outputs, values, strict=True) if isinstance(value, np.ndarray)}


def _run_reference(model: Model, protos: list[onnx.NodeProto], leaves: dict[str, onnx.TensorProto],
                   outputs: list[str]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(_mini_model(model, protos, leaves, outputs))
        values = evaluator.run(outputs, {})
    except Exception as err:  # noqa: BLE001 - the reference evaluator raises anything; the node stays
        log.debug("the reference evaluator cannot fold %s either: %s", protos[0].op_type, err)
        return {}
    return {name: value for name, value in zip(outputs, values, strict=True) if isinstance(value, np.ndarray)}


def leaf_proto(tensor: Tensor, name: str) -> onnx.TensorProto:
    """A constant's tensor as a TensorProto named like the value that holds it (what the mini model reads)."""
    return Exporter().tensor(tensor, name)
