"""The ``view-around-elementwise`` rule of eliminate-noops: ``view2(f(view1(x))) -> f(x)``.

Exporters write a linear layer on a 3-D activation as Reshape to 2-D, Gemm, Reshape back to 3-D, and
when the next layer is linear too the activation between them (GELU: eight Mul/Pow/Add/Tanh nodes) runs
in 3-D between two Reshapes that cancel. Views keep the elements' order, elementwise ops act on each
element, and an operand with one element broadcasts the same way at any shape, so when the outer view
gives back ``x``'s shape the region can run on ``x`` directly and both views go.

The region is every node between the two views: single-output elementwise ops whose other operands hold
one element (of a rank no higher than ``x``'s, which could otherwise raise the result's rank), whose
values are read only inside the region (the last one only by the outer view), with all its reads of
views reading the same ``view1`` output.
"""

from __future__ import annotations

import math

from graphopt.ir import Node, TensorType, Value

from .rules import Site

VIEW_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
ELEMENTWISE = frozenset({
    "Abs", "Neg", "Relu", "Tanh", "Sigmoid", "Exp", "Log", "Sqrt", "Erf", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "Softplus", "Softsign", "Not", "Cast", "HardSigmoid", "LeakyRelu", "Elu", "Selu",
    "Celu", "HardSwish", "Mish", "ThresholdedRelu", "Clip", "Identity",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Xor",
})
MAX_REGION = 64


def check(site: Site) -> str | None:
    """Find the region below ``site``'s view (kept in ``site.memo``), or say why there is none."""
    exit_value = site.input(0)
    if exit_value is None or not _single_use(exit_value, site):
        return "the input is used elsewhere"
    region: dict[int, Node] = {}
    entry: Node | None = None
    stack = [exit_value]
    while stack:
        value = stack.pop()
        node = value.producer
        if node is None or node.graph is not site.graph or not site.scope.is_opset_op(node):
            return f"{value.name!r} is not computed by an elementwise op after a view"
        if node.op_type in VIEW_OPS:
            if entry is not None and entry is not node:
                return "the region reads two views"
            entry = node
            continue
        if id(node) in region:
            continue
        if node.op_type not in ELEMENTWISE or len(node.outputs) != 1 or node.subgraphs():
            return f"{node.label()} is not elementwise"
        region[id(node)] = node
        if len(region) > MAX_REGION:
            return f"more than {MAX_REGION} nodes between the views"
        stack.extend(v for v in node.inputs if v is not None and not _one_element(v))
    if entry is None or not region or entry.inputs[0] is None:
        return "no view below an elementwise op"
    source = entry.inputs[0]
    shape = _known_shape(source)
    if shape is None or shape != _known_shape(site.node.outputs[0]):
        return "the outer view does not provably give back the inner view's input shape"
    rank = len(shape)
    for node in region.values():
        out = node.outputs[0]
        if out is not exit_value and (site.scope.is_output(out) or any(id(user) not in region for user in out.users())):
            return f"{out.name!r} is read outside the region"
        for value in node.inputs:
            if value is not None and _one_element(value) and len(value.shape) > rank:
                return f"{value.name!r} has a higher rank than the view's input"
    site.memo["region"] = (entry, list(region.values()))
    return None


def rewrite(site: Site) -> Value:
    """Let the region read the inner view's input; its values take that shape; the outer view goes."""
    entry, nodes = site.memo["region"]
    middle, source = entry.outputs[0], entry.inputs[0]
    for node in nodes:
        for index, value in enumerate(node.inputs):
            if value is middle:
                node.set_input(index, source)
        out = node.outputs[0]
        if isinstance(out.type, TensorType):
            out.type = TensorType(out.type.elem_type, source.shape)
    if not middle.has_uses() and not site.scope.is_output(middle):
        entry.graph.erase(entry, keep_outputs=True)
    return site.input(0)


def _single_use(value: Value, site: Site) -> bool:
    return len(value.uses()) == 1 and not site.scope.is_output(value)


def _one_element(value: Value) -> bool:
    shape = value.shape
    return shape is not None and all(isinstance(d, int) for d in shape) and math.prod(shape) == 1


def _known_shape(value: Value) -> tuple | None:
    """The shape if every dim is a number or a dim name (two equal names are equal sizes), else None."""
    shape = value.shape
    if shape is None or any(d is None or isinstance(d, str) and d.startswith("unk__") for d in shape):
        return None
    return tuple(shape)
