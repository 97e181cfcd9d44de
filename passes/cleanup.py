"""Cleanup passes every pipeline starts and ends with.

They never change a graph input or output name, never drop a node of an op
graphopt does not know (it may have effects graphopt cannot see), and recurse
into subgraphs.
"""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.ir import ArrayTensor, Graph, Model, Node, TensorType
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"}


def is_known_op(node: Node, model: Model) -> bool:
    """A standard ONNX op (pure, so removable when dead); custom ops and functions are not."""
    if node.domain not in _STANDARD_DOMAINS or model.function(node) is not None:
        return False
    return onnx.defs.has(node.op_type, node.domain if node.domain != "ai.onnx" else "")


def _reversed(graph: Graph) -> list[Node]:
    nodes = graph.nodes
    nodes.reverse()
    return nodes


@register_pass
class EliminateDeadNodes(Pass):
    name = "eliminate-dead-nodes"
    description = "Remove standard-op nodes whose outputs nobody reads"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        for graph in list(model.graphs()):
            for node in _reversed(graph):  # users before producers: one sweep removes whole dead chains
                if node.graph is None or not is_known_op(node, model):
                    continue
                if any(out.has_uses() or out.is_graph_output() for out in node.outputs):
                    continue
                graph.erase(node)
                removed += 1
        return PassResult(removed)


def _dropout_is_identity(node: Node, model: Model) -> bool:
    """Inference-mode Dropout: no mask consumer, and training_mode absent or constant false."""
    if len(node.outputs) > 1 and (node.outputs[1].has_uses() or node.outputs[1].is_graph_output()):
        return False
    if node.attr("is_test", 1) == 0 and (model.opset() or 0) < 7:
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    return training.const is not None and not bool(training.const.numpy().reshape(-1)[0])


@register_pass
class RemoveIdentity(Pass):
    name = "remove-identity"
    description = "Remove Identity nodes and inference-mode Dropout"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from .simplify.util import bypass as _bypass  # late: the simplify package imports this module

        removed = 0
        for graph in list(model.graphs()):
            for node in graph.nodes:
                if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
                    continue
                if node.op_type == "Identity" or (node.op_type == "Dropout" and _dropout_is_identity(node, model)):
                    removed += _bypass(node, node.inputs[0], graph)
        return PassResult(removed)


@register_pass
class RemoveUnusedInitializers(Pass):
    name = "remove-unused-initializers"
    description = "Drop initializers nothing reads (those that are also graph inputs stay: they are interface)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = 0
        for graph in list(model.graphs()):
            for name, value in list(graph.initializers.items()):
                if not value.has_uses() and not value.is_graph_output() and not value.is_graph_input():
                    graph.remove_initializer(name)
                    removed += 1
        return PassResult(removed)


_CONSTANT_ATTRS = {
    "value_float": lambda v: ArrayTensor(np.float32(v)),
    "value_floats": lambda v: ArrayTensor(np.asarray(v, dtype=np.float32)),
    "value_int": lambda v: ArrayTensor(np.int64(v)),
    "value_ints": lambda v: ArrayTensor(np.asarray(v, dtype=np.int64)),
}


@register_pass
class LiftConstants(Pass):
    name = "lift-constants"
    description = "Turn input-free Constant nodes into initializers, so other passes see one kind of constant"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        lifted = 0
        for graph in list(model.graph.walk_graphs()):  # function bodies cannot hold initializers
            for node in graph.nodes:
                if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attrs) != 1:
                    continue
                tensor = _constant_tensor(node)
                out = node.outputs[0]
                if tensor is None or out.is_graph_output():
                    continue  # sparse/string-list constants, or an output whose name must stay a node's
                graph.erase(node, keep_outputs=True)
                tensor.name = out.name
                out.const = tensor
                out.type = TensorType(tensor.elem_type, tensor.shape)
                graph.add_initializer(out)
                lifted += 1
        return PassResult(lifted)


def _constant_tensor(node: Node):
    (attr,) = node.attrs.values()
    if attr.ref_attr_name:
        return None
    if attr.name == "value":
        return attr.value
    make = _CONSTANT_ATTRS.get(attr.name)
    return make(attr.value) if make else None
