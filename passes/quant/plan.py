"""Which nodes can be quantized, their weight axes, and the tensors calibration must observe."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphopt.ir import Model, Node, Value

from .optable import WEIGHT_KINDS, op_kind
from .report import EXCLUDED, UNSUPPORTED, FloatNode

# Ops whose output values are a subset of the input's: the output shares the input's scale, so
# onnxruntime drops the DequantizeLinear/QuantizeLinear around them (MaxPool: runs its uint8 kernel)
# and no requantization happens.
SHARE_SCALE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")
# Activations a QuantizeLinear with zero point = qmin implements exactly (removed, range taken over).
ABSORBABLE = ("Relu", "Clip")


@dataclass
class Candidate:
    node: Node
    kind: str
    activations: list[int]  # input indices read as quantized activations
    weight: int | None = None  # input index of the constant weight
    weight_axis: int | None = None  # its output-channel axis (per-channel scales)
    bias: int | None = None  # input index of the constant bias (int32)


@dataclass
class Plan:
    candidates: dict[str, Candidate] = field(default_factory=dict)  # by node name
    kept_float: list[FloatNode] = field(default_factory=list)

    def tensors(self, absorb: bool) -> list[str]:
        """Activation tensors whose ranges calibration must observe (see :func:`observed_tensors`)."""
        names = (name for cand in self.candidates.values() for name in observed_tensors(cand, absorb))
        return list(dict.fromkeys(names))


def observed_tensors(cand: Candidate, absorb: bool) -> list[str]:
    """The activation tensors whose ranges quantizing ``cand`` uses: its activation inputs, its output, and
    the outputs of absorbable activations and scale-sharing ops right after it.

    With ``absorb`` (asymmetric ranges), the output of a node read only by a Relu/Clip is not observed: when
    the node is quantized the activation is absorbed and its output range is used instead.
    """
    names = [cand.node.inputs[i].name for i in cand.activations]
    out = cand.node.outputs[0]
    names += [user.outputs[0].name for user in out.users()  # same graph: a body's reader is not rewritten here
              if user.op_type in ABSORBABLE + SHARE_SCALE and user.graph is cand.node.graph]
    if not (absorb and absorbable_activation(out) is not None):
        names.append(out.name)
    return names


def absorbable_activation(out: Value) -> Node | None:
    """The Relu/Clip(0, max) that is ``out``'s only reader, if a QuantizeLinear on ``out`` can replace it."""
    users = out.users()
    if len(out.uses()) != 1 or out.is_graph_output() or users[0].op_type not in ABSORBABLE \
            or users[0].graph is not out.graph:  # a reader inside an If/Loop body cannot be removed here
        return None
    act = users[0]
    if act.outputs[0].is_graph_output():
        return None
    if act.op_type == "Relu":
        return act
    low = act.inputs[1] if len(act.inputs) > 1 else None
    lo = float(low.const.numpy()) if is_const(low) else act.attr("min", None)
    high = act.inputs[2] if len(act.inputs) > 2 else None
    return act if lo == 0.0 and (high is None or is_const(high)) else None


def is_const(value: Value | None) -> bool:
    return value is not None and value.const is not None


def make_plan(model: Model, kinds: set[str], exclude: set[str] = frozenset(), weights_only: bool = False,
              allowed: set[str] | None = None, why_not: str = "") -> Plan:
    """Candidates among the main graph's nodes whose kind is in ``kinds`` (subgraphs stay float).

    Nodes of a kind in ``allowed`` but not in ``kinds`` are reported as kept float for ``why_not``.
    """
    plan = Plan()
    for node in model.graph:
        kind = op_kind(node)
        if kind is None or (allowed is not None and kind not in allowed):
            continue
        if node.name in exclude:
            plan.kept_float.append(FloatNode(node.name, node.op_type, EXCLUDED, "nodes_to_exclude"))
            continue
        if kind not in kinds:
            detail = "not in op_types" if why_not == EXCLUDED else "onnxruntime has no int8 kernel for it here"
            plan.kept_float.append(FloatNode(node.name, node.op_type, why_not, detail))
            continue
        cand, why = _candidate(node, kind, weights_only)
        if cand is None:
            plan.kept_float.append(FloatNode(node.name, node.op_type, UNSUPPORTED, why))
        else:
            plan.candidates[node.name] = cand
    return plan


def _candidate(node: Node, kind: str, weights_only: bool) -> tuple[Candidate | None, str]:
    inputs = node.inputs
    if kind in WEIGHT_KINDS:
        if len(inputs) < 2 or not is_const(inputs[1]):
            return None, "weight is not a constant"
        if is_const(inputs[0]):
            return None, "constant input"
        if (dtype := np.dtype(inputs[1].const.dtype)) != np.float32:
            return None, f"{dtype} weight: onnxruntime's int8 kernels and DequantizeLinear here produce float32"
        axis = _weight_axis(node)
        if axis is None:
            return None, "unsupported weight layout"
        bias = 2 if len(inputs) > 2 and inputs[2] is not None else None
        if bias is not None and (not is_const(inputs[2]) or len(inputs[2].shape or ()) != 1):
            return None, "bias is not a constant vector"
        return Candidate(node, kind, [0], 1, axis, bias), ""
    if weights_only:
        return None, "no weight"
    if any(v is None or is_const(v) for v in inputs):
        return None, "constant operand (onnxruntime fuses only all-activation inputs)"
    if kind in ("Add", "Mul") and len(inputs) != 2:
        return None, "not binary"
    return Candidate(node, kind, list(range(len(inputs)))), ""


def _weight_axis(node: Node) -> int | None:
    """The output-channel axis of the weight, where per-channel scales go."""
    shape = node.inputs[1].shape or ()
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        if node.attr("alpha", 1.0) != 1.0 or node.attr("transA", 0):
            return None
        return 0 if node.attr("transB", 0) else 1
    if node.op_type == "MatMul" and len(shape) == 2:
        return 1
    return None
