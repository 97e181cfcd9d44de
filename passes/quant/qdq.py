"""QDQ insertion: QuantizeLinear/DequantizeLinear pairs laid out the way onnxruntime's CPU QDQ transformer
turns them into int8 kernels (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, ...), and weight-only int8.

Layout rules (each learned from what onnxruntime fuses):

* every quantized node reads its activations through DequantizeLinear and (except Gemm/MatMul whose
  consumers all stay float: QGemm and MatMulIntegerToFloat have float outputs) writes through a
  QuantizeLinear; a tensor gets one Q/DQ pair however many nodes read it;
* weights are constant int8 initializers + DequantizeLinear (per-channel on the output-channel axis),
  quantized once per initializer even when several nodes share it;
* the bias of Conv/Gemm is an int32 initializer with scale = input scale x weight scale and zero point 0:
  exactly what QLinearConv/QGemm add in int32 (a saturating entry is reported, never wrapped);
* a Relu, or a Clip(0, max), right after a quantized node is removed and its range given to the node's
  QuantizeLinear, whose zero point is then qmin so the Q clamps exactly like the activation;
* Reshape/Flatten/Squeeze/Unsqueeze/Transpose outputs share their input's scale, so onnxruntime runs them
  on the int8 data and nothing is requantized;
* float consumers of a tensor produced in float keep reading the float value (no needless error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir import Graph, Model, Node, Value
from graphopt.ir.tensor import ArrayTensor

from .config import QuantConfig
from .optable import STATIC_KINDS, op_kind, saturating_u8s8
from .plan import SHARE_SCALE, Candidate, absorbable_activation, make_plan
from .qparams import QParams, activation_qparams, qrange, quantize_bias, quantize_weight, sqnr_db
from .report import LayerError

Range = tuple[float, float]
#: Ops onnxruntime's QDQ propagation copies a DequantizeLinear past (qdq_propagation.cc, CanNodePropagate).
ORT_PROPAGATES = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")


@dataclass
class Inserted:
    """What an insertion did, for the report."""

    quantized: list[str] = field(default_factory=list)  # node names
    weights: list[LayerError] = field(default_factory=list)
    activations: dict[str, tuple[str, Candidate, QParams]] = field(default_factory=dict)  # fp32 name -> (DQ, ..)
    absorbed: dict[str, str] = field(default_factory=dict)  # quantized node -> fp32 output of its removed Relu
    padded: list[str] = field(default_factory=list)  # convs whose input channels align.py padded
    notes: list[str] = field(default_factory=list)


class _Builder:
    """Adds constants and Q/DQ nodes to one graph (appended; the graph is toposorted at the end)."""

    def __init__(self, graph: Graph, config: QuantConfig) -> None:
        self.graph, self.config = graph, config
        self.weights: dict[tuple[str, int | None], tuple[Value, QParams]] = {}
        # float compute (weight-only) never saturates; int8 kernels may (see QuantConfig.reduce_range)
        auto = saturating_u8s8() and config.mode != "weight_only"
        self.reduce_range = auto if config.reduce_range is None else config.reduce_range

    def const(self, array: np.ndarray, hint: str) -> Value:
        name = self.graph.fresh_name(hint)
        return self.graph.add_initializer(ArrayTensor(np.asarray(array), name))

    def node(self, op: str, inputs: list[Value | None], hint: str, **attrs) -> Value:
        out = self.graph.fresh_name(hint)
        node = Node(op, inputs, attrs, outputs=[out], name=self.graph.fresh_name(f"{hint}_node"))
        self.graph.append(node)
        return node.outputs[0]

    def dequantize(self, q: Value, qp: QParams, hint: str) -> Value:
        scale, zp = self.const(qp.scale, f"{hint}_scale"), self.const(qp.zero_point, f"{hint}_zero_point")
        attrs = {"axis": qp.axis} if qp.axis is not None and qp.scale.ndim else {}
        return self.node("DequantizeLinear", [q, scale, zp], f"{hint}_dq", **attrs)

    def qdq(self, value: Value, qp: QParams) -> Value:
        scale, zp = self.const(qp.scale, f"{value.name}_scale"), self.const(qp.zero_point, f"{value.name}_zp")
        q = self.node("QuantizeLinear", [value, scale, zp], f"{value.name}_q")
        return self.node("DequantizeLinear", [q, scale, zp], f"{value.name}_dq")

    def weight(self, value: Value, axis: int | None, cand: Candidate, report: Inserted) -> tuple[Value, QParams]:
        """The DequantizeLinear of an int8 copy of ``value``; one per initializer and axis (shared weights)."""
        key = (value.name, axis)
        if key not in self.weights:
            q, qp = self.int8_weight(value, axis, cand, report)
            self.weights[key] = (self.dequantize(q, qp, value.name), qp)
        return self.weights[key]

    def int8_weight(self, value: Value, axis: int | None, cand: Candidate, report: Inserted) -> tuple[Value, QParams]:
        """The int8 initializer holding ``value`` quantized (its SQNR goes into the report)."""
        w = value.const.numpy()
        q, qp = quantize_weight(w, axis, self.reduce_range)
        scale = qp.scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)]) if axis is not None else qp.scale
        report.weights.append(LayerError(value.name, cand.node.name, cand.node.op_type, "weight",
                                         sqnr_db(w, q.astype(np.float32) * scale), float(qp.scale.max()), "int8"))
        return self.const(q, f"{value.name}_quantized"), qp


def insert_weight_only(model: Model, selected: set[str], config: QuantConfig) -> Inserted:
    """int8 weights + DequantizeLinear in front of every selected Conv/Gemm/MatMul; compute stays float."""
    report = Inserted()
    build = _Builder(model.graph, config)
    for name, cand in make_plan(model, set(STATIC_KINDS), set(), weights_only=True).candidates.items():
        if name in selected:
            dq, _ = build.weight(cand.node.inputs[cand.weight], _axis(cand, config), cand, report)
            cand.node.set_input(cand.weight, dq)
            report.quantized.append(name)
    _finish(model.graph)
    return report


def insert_static(model: Model, selected: set[str], ranges: Mapping[str, Range], config: QuantConfig) -> Inserted:
    """Quantize the selected nodes (names) of ``model`` in place with QDQ pairs from calibrated ``ranges``."""
    report = Inserted()
    graph = model.graph
    build = _Builder(graph, config)
    act_dtype = np.dtype(config.activation_type)
    cands = {n: c for n, c in make_plan(model, set(STATIC_KINDS), set()).candidates.items()
             if n in selected and all(c.node.inputs[i].name in ranges for i in c.activations)}
    params: dict[str, QParams] = {}

    def qparams(name: str) -> QParams:
        if name not in params:
            params[name] = activation_qparams(*ranges[name], act_dtype, config.symmetric)
        return params[name]

    report.absorbed = _absorb_activations(graph, cands, ranges, act_dtype, config, params)
    _share_concat_scales(cands, ranges, params, act_dtype, config)
    quantized_consumer = set(cands)
    wanted: dict[str, Value] = {}
    for cand in cands.values():
        for i in cand.activations:
            wanted.setdefault(cand.node.inputs[i].name, cand.node.inputs[i])
        out = cand.node.outputs[0]
        float_output_ok = cand.kind in ("Gemm", "MatMul") and not any(u.name in cands for u in out.users())
        known = out.name in ranges or out.name in params
        if known and not out.is_graph_output() and (not float_output_ok or cand.node.name in report.absorbed):
            wanted.setdefault(out.name, out)
    _share_scales(graph, wanted, ranges, params, qparams, quantized_consumer)
    for name, value in wanted.items():
        qp = qparams(name)
        dq = build.qdq(value, qp)
        int8_producer = value.producer is not None and value.producer.name in cands
        for node, index in value.uses():
            if node is dq.producer.inputs[0].producer:
                continue  # the QuantizeLinear itself
            if int8_producer or node.name in quantized_consumer:
                node.set_input(index, dq)
        producer = value.producer.name if value.producer is not None else ""
        reader = next((c for c in cands.values() if any(c.node.inputs[i] is dq for i in c.activations)), None)
        report.activations[report.absorbed.get(producer, name)] = (dq.name, reader or cands.get(producer), qp)
    for cand in cands.values():
        node = cand.node
        dq_w, w_qp = build.weight(node.inputs[cand.weight], _axis(cand, config), cand, report) \
            if cand.weight is not None else (None, None)
        if dq_w is not None:
            node.set_input(cand.weight, dq_w)
        if cand.bias is not None:
            x_scale = qparams(_fp32_name(node.inputs[0])).scale
            q, qp, saturated = quantize_bias(node.inputs[cand.bias].const.numpy(), x_scale, w_qp)
            if saturated:
                report.notes.append(f"{node.name}: {saturated} bias entries saturate int32")
            bias = build.dequantize(build.const(q, f"{node.inputs[cand.bias].name}_int32"), qp,
                                    f"{node.name}_bias")
            node.set_input(cand.bias, bias)
        report.quantized.append(node.name)
    if act_dtype == np.int8 and (model.opset() or 0) >= 21:
        _requantize_after_propagating_ops(graph, build)
    _finish(graph)
    return report


def _requantize_after_propagating_ops(graph: Graph, build: _Builder) -> None:
    """Write the Q/DQ pair onnxruntime would copy past a data-movement op into the file itself.

    onnxruntime's QDQ propagation copies a DequantizeLinear past the ops of ``ORT_PROPAGATES`` it feeds when no
    QuantizeLinear follows (a DequantizeLinear read by several nodes is first copied once per reader). In
    onnxruntime 1.32 the copied QuantizeLinear of an opset-21+ model carries ``output_dtype=int8``, and the
    int8-to-uint8 activation conversion that runs next changes its zero point but not that attribute: the model
    no longer loads. The same scale and zero point after the op change no value (its outputs are some of its
    input's), and a QuantizeLinear there stops the propagation.
    """
    work = [n for n in graph if n.op_type == "DequantizeLinear" and n.inputs[0].producer is not None
            and n.inputs[0].producer.op_type == "QuantizeLinear"]
    while work:
        dq = work.pop()
        for op, index in dq.outputs[0].uses():
            out = op.outputs[0]
            if index != 0 or op.op_type not in ORT_PROPAGATES or any(u.op_type == "QuantizeLinear"
                                                                       for u in out.users()):
                continue
            q = build.node("QuantizeLinear", [out, dq.inputs[1], dq.inputs[2]], f"{out.name}_q")
            new = build.node("DequantizeLinear", [q, dq.inputs[1], dq.inputs[2]], f"{out.name}_dq")
            out.replace_all_uses_with(new, include_graph_outputs=True)
            q.producer.set_input(0, out)  # the QuantizeLinear itself still reads the op
            if new.is_graph_output():  # the interface keeps its name
                out.name, new.name, new.type = graph.fresh_name(f"{out.name}_before_q"), out.name, out.type
            work.append(new.producer)


def _fp32_name(value: Value) -> str:
    """The name of the float tensor a DequantizeLinear output stands for (its QuantizeLinear's input)."""
    q = value.producer.inputs[0].producer if value.producer is not None and value.producer.op_type == \
        "DequantizeLinear" else None
    return q.inputs[0].name if q is not None and q.op_type == "QuantizeLinear" else value.name


def _absorb_activations(graph: Graph, cands: Mapping[str, Candidate], ranges: Mapping[str, Range],
                        act_dtype: np.dtype, config: QuantConfig, params: dict[str, QParams]) -> dict[str, str]:
    """Remove Relu/Clip(0, max) after quantized nodes; their output range becomes the node's Q range.

    Returns {quantized node: the removed activation's output name} (the fp32 tensor its Q now stands for).
    """
    if config.symmetric:
        return {}  # the zero point sits mid-range: the Q cannot clamp at 0
    absorbed = {}
    for cand in cands.values():
        out = cand.node.outputs[0]
        act = absorbable_activation(out)
        if act is None or act.outputs[0].name not in ranges:
            continue
        act_out = act.outputs[0]
        qp = activation_qparams(0.0, ranges[act_out.name][1], act_dtype, False)
        if int(qp.zero_point) != qrange(act_dtype)[0]:
            continue
        params[out.name] = qp
        act_out.replace_all_uses_with(out)
        graph.erase(act)
        absorbed[cand.node.name] = act_out.name
    return absorbed


def _share_concat_scales(cands: Mapping[str, Candidate], ranges: Mapping[str, Range], params: dict[str, QParams],
                         act_dtype: np.dtype, config: QuantConfig) -> None:
    """A Concat and the inputs only it reads get one scale (the union range): a pure int8 copy, no requantizing.

    An input whose QuantizeLinear already clamps a removed Relu keeps that role only if the union starts at 0.
    """
    for cand in cands.values():
        if cand.kind != "Concat":
            continue
        inputs = [cand.node.inputs[i] for i in cand.activations]
        names = [v.name for v in inputs] + [cand.node.outputs[0].name]
        los, his = zip(*(ranges[n] for n in names if n in ranges), strict=True)
        qp = activation_qparams(min(los), max(his), act_dtype, config.symmetric)
        params[cand.node.outputs[0].name] = qp
        for value in inputs:
            clamps = value.name in params and int(params[value.name].zero_point) == qrange(act_dtype)[0]
            if len(value.uses()) == 1 and not value.is_graph_input() and (not clamps or min(los) >= 0):
                params[value.name] = qp


def _share_scales(graph: Graph, wanted: dict[str, Value], ranges: Mapping[str, Range], params: dict[str, QParams],
                  qparams, quantized_consumer: set[str]) -> None:
    """Outputs of scale-sharing ops between quantized tensors take their input's parameters.

    A scale-sharing op that is itself quantizable (MaxPool) does so only when selected: left float by the latency
    or budget step, its output is what gets quantized. (onnxruntime's QDQ propagation still moves that
    QuantizeLinear above a MaxPool-12 whose input has one reader, and runs the pool as uint8 NCHW.)"""
    for node in graph:
        if node.op_type not in SHARE_SCALE or not node.inputs or node.inputs[0] is None:
            continue
        if op_kind(node) is not None and node.name not in quantized_consumer:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if out.name in wanted and src.name in ranges:
            params[out.name] = qparams(src.name)
            wanted.setdefault(src.name, src)
            quantized_consumer.add(node.name)


def _axis(cand: Candidate, config: QuantConfig) -> int | None:
    return cand.weight_axis if config.per_channel else None


def _finish(graph: Graph) -> None:
    graph.toposort()
    for name in [n for n, v in graph.initializers.items() if not v.has_uses() and not v.is_graph_output()]:
        graph.remove_initializer(name)
