"""NCHWc layout for onnxruntime's CPU provider on this machine (``--target-runtime ort-cpu``).

What ORT_ENABLE_ALL does to a CNN on CPU, read from the graph it saves with ``optimized_model_filepath``
(onnxruntime 1.32, ResNet-50): every Conv becomes ``com.microsoft.nchwc`` ``Conv`` working on a blocked
layout ([N, C/B, H, W, B] with B = 8 on AVX2, 16 on AVX-512), its filter reordered offline (OIHWBiBo;
OIHWBo for depthwise convs and for a first conv that reads the NCHW image directly), the following Relu
fused as ``activation`` and the residual Add fused as the Conv's 4th input (``Sum``: act(conv + b + sum));
MaxPool / AveragePool / GlobalAveragePool run blocked, and ``ReorderInput`` / ``ReorderOutput`` convert
at the borders. That graph ran as fast under ORT_ENABLE_BASIC and ORT_DISABLE_ALL as the original under
ALL (ResNet-50, CPU time 0.99x / 1.03x): the speed is in the kernels, which any level runs.

Why this cannot be portable ONNX: standard ONNX has no blocked tensor layout and no Conv that reads or
writes one (a Reshape/Transpose spelling of the reorder would only add copies: the blocked kernels are the
gain), and the block size is a property of the CPU MLAS runs on. A model written for B = 8 computes
garbage or fails where MLAS picks 16 (onnxruntime itself warns that such a saved model "should only be
used in the same environment the model was optimized in"). So the pass runs only for the host-bound
target ``ort-cpu``, and probes the block size from the installed onnxruntime (:func:`block_size`).

Covered: Conv (2-D, constant weights, float32, NOTSET padding; group 1 or depthwise, reading a blocked
tensor, an NCHW one whose channels are a multiple of B, or, group 1, an NCHW image of fewer than B
channels). As onnxruntime does, channel counts that are not a multiple of B are padded up to one: zero
filters for the extra output channels, zero taps for the extra input channels, and ``ReorderOutput`` drops
them (MobileNetV2's 24-channel convs on AVX-512, B = 16). Relu / Clip / Sigmoid / Tanh /
LeakyRelu / HardSigmoid after a Conv (fused), residual Add of two blocked tensors (fused into the Conv
that computed one of them when it is used once, else an elementwise Add on blocked tensors), unary
activations on blocked tensors, MaxPool (one output) / AveragePool / GlobalAveragePool / GlobalMaxPool.
Everything else reads the NCHW tensor through one ``ReorderOutput`` per value. Only the main graph is
laid out (If/Loop bodies stay NCHW).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile

import numpy as np

from graphopt.ir import ArrayTensor, Graph, Model, Node, TensorType, Value
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass
from graphopt.shapes import infer_shapes

log = logging.getLogger(__name__)

NCHWC = "com.microsoft.nchwc"
TARGET = "ort-cpu"
#: activation ops the nchwc Conv applies itself, with the attributes that become ``activation_params``
ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": (("alpha", 0.01),),
               "HardSigmoid": (("alpha", 0.2), ("beta", 0.5))}
UNARY = frozenset({*ACTIVATIONS, "Clip", "HardSwish", "Identity"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides")


# ------------------------------------------------------------------------------------------ block size


@functools.cache
def block_size() -> int | None:
    """The NCHWc block size onnxruntime's CPU provider uses on this machine, or None when it uses none.

    Read from what onnxruntime itself writes: a 16 -> 32 channel Conv optimized at ORT_ENABLE_ALL, whose
    reordered filter matches the OIHWBiBo layout for exactly one block size.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(32 * 16 * 9, dtype=np.float32).reshape(32, 16, 3, 3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weights, "w")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix="graphopt-nchwc-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "probe.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    conv = next((n for n in optimized.graph.node if n.domain == NCHWC and n.op_type == "Conv"), None)
    if conv is None:
        return None
    reordered = next(numpy_helper.to_array(t) for t in optimized.graph.initializer if t.name == conv.input[1])
    for size in (16, 8, 4):
        if np.array_equal(reorder_filter(weights, size, blocked_input=True), reordered):
            return size
    log.warning("onnxruntime's NCHWc filter layout is not one graphopt knows; the nchwc-layout pass is off")
    return None


def reorder_filter(weights: np.ndarray, block: int, *, blocked_input: bool) -> np.ndarray:
    """OIHW -> OIHWBiBo (input and output channels blocked) or OIHWBo (output channels only), keeping the
    OIHW dims as onnxruntime stores them."""
    o, i, h, w = weights.shape
    if blocked_input:
        out = weights.reshape(o // block, block, i // block, block, h, w).transpose(0, 2, 4, 5, 3, 1)
    else:
        out = weights.reshape(o // block, block, i, h, w).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(out).reshape(o, i, h, w)


# ------------------------------------------------------------------------------------------ the pass


@register_pass
class NchwcLayout(Pass):
    name = "nchwc-layout"
    description = (f"Convs, pools and their activations/residual Adds -> onnxruntime's {NCHWC} ops on blocked "
                   f"tensors (only for --target-runtime {TARGET}: the layout is bound to this CPU)")
    level = "fuse"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.config.get("target-runtime") != TARGET:
            return PassResult(0)
        block = block_size()
        if block is None:
            return PassResult(0, details={"skipped": "onnxruntime uses no NCHWc layout on this CPU"})
        if any(n.domain == NCHWC for n in model.graph):
            return PassResult(0)  # laid out in an earlier iteration; what stayed NCHW stays
        infer_shapes(model)  # residual Adds are fused only between tensors of one proven shape
        converted = _Layout(model, model.graph, block).run()
        if converted:
            model.opset_imports.setdefault(NCHWC, 1)
        return PassResult(converted, details={"block": block})


class _Layout:
    """One sweep over a graph in topological order; ``blocked`` maps an NCHW value to its blocked twin."""

    def __init__(self, model: Model, graph: Graph, block: int) -> None:
        self.model, self.graph, self.block = model, graph, block
        self.blocked: dict[int, Value] = {}
        self.channels: dict[int, int] = {}  # id(blocked value) -> its (unpadded) channel count
        self.made: dict[int, Node] = {}  # id(blocked value) -> the nchwc Conv that computes it
        self.nchw_sources: set[int] = set()  # values computed in NCHW and reordered (their twin reads them)
        self.converted = 0

    def run(self) -> int:
        for node in list(self.graph):
            if node.graph is self.graph and node.domain in ("", "ai.onnx"):
                self._visit(node)
        if self.converted:
            self._reorder_outputs()
            self.graph.toposort()  # a fused residual input may come from a node after its Conv
        return self.converted

    # -- per op ------------------------------------------------------------------------
    def _visit(self, node: Node) -> None:
        x = node.inputs[0] if node.inputs else None
        twin = self.blocked.get(id(x)) if x is not None else None
        if node.op_type == "Conv":
            self._conv(node, x, twin)
        elif twin is not None and node.op_type in UNARY and not _fuse_blocked(node):
            self._activation(node, twin)
        elif node.op_type == "Add" and len(node.inputs) == 2:
            self._add(node)
        elif twin is not None and node.op_type in POOLS and len(node.outputs) == 1:
            self._emit(node, node.op_type, [twin], _copy_attrs(node), self.channels[id(twin)])

    def _conv(self, node: Node, x: Value, twin: Value | None) -> None:
        w, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        if not _plain_conv(node, x, w, bias):
            return
        out_channels, in_per_group, *_ = w.const.shape
        group, channels = node.attr("group", 1), x.shape[1]
        blockable = twin is not None or channels % self.block == 0  # a twin is already padded to whole blocks
        padded = self._padded(out_channels)
        attrs = {k: node.attr(k) for k in CONV_ATTRS if node.attr(k) is not None}
        if group == 1 and blockable:
            source = twin or self._reorder_input(node, x)
            weights = reorder_filter(_pad_filter(w.const.numpy(), padded, self._padded(channels)), self.block,
                                     blocked_input=True)
        elif group == 1 and channels < self.block and twin is None:
            source = x
            weights = reorder_filter(_pad_filter(w.const.numpy(), padded, channels), self.block, blocked_input=False)
        elif group == channels == out_channels and in_per_group == 1 and blockable:
            source = twin or self._reorder_input(node, x)
            weights = reorder_filter(_pad_filter(w.const.numpy(), padded, 1), self.block, blocked_input=False)
            attrs["group"] = padded
        else:
            return
        if bias is not None and padded != out_channels:
            bias = self._const(np.pad(bias.const.numpy(), (0, padded - out_channels)), bias.name)
        inputs = [source, self._const(weights, w.name)] + ([bias] if bias is not None else [])
        conv = self._emit(node, "Conv", inputs, attrs, out_channels)
        self.made[id(conv.outputs[0])] = conv

    def _padded(self, channels: int) -> int:
        return -(-channels // self.block) * self.block

    def _activation(self, node: Node, twin: Value) -> None:
        conv = self.made.get(id(twin))
        params = _activation_params(node)
        if conv is not None and params is not None and "activation" not in conv.attrs and _used_once(node.inputs[0]):
            conv.set_attr("activation", node.op_type)
            if params:
                conv.set_attr("activation_params", params)
            self._alias(node, twin)
        else:
            self._emit(node, node.op_type, [twin, *node.inputs[1:]], _copy_attrs(node), self.channels[id(twin)])

    def _add(self, node: Node) -> None:
        a, b = node.inputs
        ta, tb = self.blocked.get(id(a)), self.blocked.get(id(b))
        if ta is None or tb is None or a.shape is None or a.shape != b.shape:
            return
        for first, sum_input in ((a, tb), (b, ta)):
            conv = self.made.get(id(self.blocked[id(first)]))
            if (conv is not None and "activation" not in conv.attrs and len(conv.inputs) < 4
                    and _used_once(first)):
                if len(conv.inputs) == 2:  # Sum is input 3: an absent bias must be spelled out
                    zeros = np.zeros(conv.inputs[1].const.shape[0], np.float32)
                    conv.set_inputs([*conv.inputs, self._const(zeros, f"{node.name or 'conv'}_zero_bias")])
                conv.set_inputs([*conv.inputs, sum_input])
                self._alias(node, self.blocked[id(first)])
                return
        self._emit(node, "Add", [ta, tb], {}, self.channels[id(ta)])

    # -- building ----------------------------------------------------------------------
    def _emit(self, node: Node, op_type: str, inputs: list, attrs: dict, channels: int) -> Node:
        """A node of ``op_type`` computing ``node``'s output in the blocked layout, placed before ``node``."""
        domain = NCHWC if op_type in ("Conv", *POOLS) else ""
        new = Node(op_type, inputs, attrs, outputs=[self.graph.fresh_name(f"{node.outputs[0].name}_nchwc")],
                   domain=domain, name=self.graph.fresh_name(f"{node.name or node.op_type}_nchwc"))
        new.metadata["graphopt.rule"] = NchwcLayout.name
        self.graph.insert_before(node, new)
        out = new.outputs[0]
        out.type = node.outputs[0].type
        self.channels[id(out)] = channels
        self._alias(node, out)
        return new

    def _alias(self, node: Node, blocked: Value) -> None:
        self.blocked[id(node.outputs[0])] = blocked
        self.converted += 1

    def _reorder_input(self, node: Node, x: Value) -> Value:
        new = Node("ReorderInput", [x], {"channels_last": 0}, outputs=[self.graph.fresh_name(f"{x.name}_nchwc")],
                   domain=NCHWC, name=self.graph.fresh_name("ReorderInput"))
        self.graph.insert_before(node, new)
        new.outputs[0].type = x.type
        self.blocked[id(x)] = new.outputs[0]
        self.nchw_sources.add(id(x))
        self.channels[id(new.outputs[0])] = x.shape[1]
        return new.outputs[0]

    def _const(self, array: np.ndarray, hint: str) -> Value:
        value = Value(self.graph.fresh_name(f"{hint}_nchwc"), const=ArrayTensor(array))
        value.type = TensorType(1, array.shape)
        value.const.name = value.name
        self.graph.add_initializer(value)
        return value

    def _reorder_outputs(self) -> None:
        """Original values still read by NCHW consumers (or graph outputs) come from one ReorderOutput of
        their blocked twin; the original producers of converted values then go."""
        by_id = {id(v): v for v in self.graph.values()}
        originals = {id(by_id[key].producer): by_id[key].producer for key in self.blocked
                     if key in by_id and key not in self.nchw_sources and by_id[key].producer is not None}
        for key, twin in self.blocked.items():
            value = by_id.get(key)
            if value is None or key in self.nchw_sources:
                continue  # still computed in NCHW: its twin is a ReorderInput of it
            readers = [(user, i) for user, i in value.uses() if id(user) not in originals]
            if not readers and not value.is_graph_output():
                continue
            reorder = Node("ReorderOutput", [twin], {"channels": self.channels[id(twin)], "channels_last": 0},
                           outputs=[self.graph.fresh_name(f"{value.name}_nchw")], domain=NCHWC,
                           name=self.graph.fresh_name("ReorderOutput"))
            self.graph.insert_before(value.producer, reorder)
            out = reorder.outputs[0]
            out.type = value.type
            for user, i in readers:
                user.set_input(i, out)
            if value.is_graph_output():
                outputs = list(self.graph.outputs)
                outputs[outputs.index(value)] = out
                name = value.name
                value.name = self.graph.fresh_name(f"{name}_nchw_original")
                out.name = name
                self.graph.outputs = outputs
        for node in reversed(list(self.graph)):
            if id(node) in originals:
                self.graph.erase(node)


# ------------------------------------------------------------------------------------------ checks


def _plain_conv(node: Node, x: Value, w: Value | None, bias: Value | None) -> bool:
    return (w is not None and w.const is not None and not w.is_graph_input() and len(w.const.shape) == 4
            and w.elem_type == 1 and x.elem_type == 1 and x.shape is not None and len(x.shape) == 4
            and isinstance(x.shape[1], int) and node.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET")
            and (bias is None or (bias.const is not None and not bias.is_graph_input())))


def _pad_filter(weights: np.ndarray, out_channels: int, in_channels: int) -> np.ndarray:
    """Zero filters for the padding output channels and zero taps for the padding input channels: those
    channels of a blocked tensor hold whatever the ops before left there (Sigmoid(0) = 0.5), and zero
    weights keep it out of every real channel."""
    o, i, *_ = weights.shape
    return np.pad(weights, [(0, out_channels - o), (0, in_channels - i), (0, 0), (0, 0)])


def _used_once(value: Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _fuse_blocked(node: Node) -> bool:
    """Clip with non-constant bounds cannot become activation params nor run on a blocked tensor here."""
    return node.op_type == "Clip" and any(v is not None and v.const is None for v in node.inputs[1:])


def _activation_params(node: Node) -> list[float] | None:
    """``activation_params`` for a fusable activation ([] for none), None when it cannot be fused."""
    if node.op_type == "Clip":
        bounds = [float(v.const.numpy().reshape(-1)[0]) if v is not None else default
                  for v, default in zip((*node.inputs[1:], None, None)[:2], (-3.4028234663852886e38,
                                                                           3.4028234663852886e38), strict=True)]
        return bounds if len(node.inputs) > 1 else None  # opset < 11 Clip keeps bounds in attributes
    if node.op_type not in ACTIVATIONS:
        return None
    return [float(node.attr(name, default)) for name, default in ACTIVATIONS[node.op_type]]


def _copy_attrs(node: Node) -> dict:
    return {name: node.attr(name) for name in node.attrs}
