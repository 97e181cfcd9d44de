"""Input channels padded to what onnxruntime's fast int8 convolution needs.

On x86, onnxruntime runs a QLinearConv with symmetric int8 weights (ours) through MLAS's ``ConvSym``
kernels (AVX2, AVX-VNNI, AVX-512 VNNI) only when its input channels are a multiple of 4 and its output
channels at least 16 and a multiple of 4 (``MlasConvSymPackWSize``); any other conv falls back to an
im2col + int8 GEMM. An image model's stem reads 3 channels (a digits model's, 1), so it always fell back.
Padding the quantized image with zero-point channels, and the int8 weights with zero input channels,
changes no output value (the padded channels meet zero weights) and moves the stem onto the fast kernel:
the small ResNet's stem took 44 instead of 80 us (onnxruntime's profile, AVX-512 VNNI). The padding is a
uint8 ``Pad`` between the input's QuantizeLinear and the conv's own DequantizeLinear, so other readers of
the input are unchanged. Whether it pays is timed (``api._first_layers``): on the digits CNN's 8x8 image the
extra node cost more than the kernel saved.
"""

from __future__ import annotations

import platform

import numpy as np

from graphopt.ir import Model, Node, Value
from graphopt.ir.tensor import ArrayTensor

from .plan import is_const

CHANNEL_MULTIPLE = 4  # KernelInputChannelAlignment of every x86 ConvSym dispatch
MIN_OUTPUT_CHANNELS = 16  # FilterOutputChannelPackCount
OUTPUT_CHANNEL_MULTIPLE = 8  # KernelOutputChannelAlignment: 8 on AVX2 / AVX-VNNI, 4 on AVX-512 (8 fits both)


def has_conv_sym_kernels() -> bool:
    """MLAS has ConvSym kernels on x86 only (on ARM64 just the depthwise one)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def input_convs_to_pad(model: Model) -> list[Node]:
    """Quantized group-1 convs that read a model input whose channel count keeps them off ConvSym."""
    if not has_conv_sym_kernels() or (model.opset() or 0) < 11:  # Pad reads its pads as an input from 11
        return []
    return [node for node in model.graph if _padding(node) is not None]


def pad_input_channels(model: Model) -> list[str]:
    """Pad the input channels of every conv ``input_convs_to_pad`` finds; returns their names."""
    graph = model.graph
    padded = []
    for conv in input_convs_to_pad(model):
        x_dq, w_dq = conv.inputs[0].producer, conv.inputs[1].producer
        extra = _padding(conv)
        q, scale, zero_point = x_dq.inputs[0], x_dq.inputs[1], x_dq.inputs[2]
        rank = len(w_dq.inputs[0].shape)
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + 1] = extra  # the end of axis 1 (channels)
        pad = Node("Pad", [q, _const(graph, pads, f"{conv.name}_channel_pads"), zero_point],
                   outputs=[graph.fresh_name(f"{q.name}_padded")], name=graph.fresh_name(f"{conv.name}_pad_channels"))
        dq = Node("DequantizeLinear", [pad.outputs[0], scale, zero_point],
                  outputs=[graph.fresh_name(f"{q.name}_padded_dq")], name=graph.fresh_name(f"{conv.name}_input_dq"))
        graph.insert_before(conv, [pad, dq])
        conv.set_input(0, dq.outputs[0])
        w = w_dq.inputs[0].const.numpy()
        wide = np.zeros((w.shape[0], w.shape[1] + extra, *w.shape[2:]), w.dtype)
        wide[:, : w.shape[1]] = w
        w_attrs = {"axis": w_dq.attr("axis")} if w_dq.attr("axis") is not None else {}
        w_wide = Node("DequantizeLinear", [_const(graph, wide, f"{w_dq.inputs[0].name}_padded"), *w_dq.inputs[1:]],
                      w_attrs, outputs=[graph.fresh_name(f"{conv.name}_weight_padded")],
                      name=graph.fresh_name(f"{conv.name}_weight_dq"))
        graph.insert_before(conv, w_wide)
        conv.set_input(1, w_wide.outputs[0])
        for old, new in ((x_dq, dq), (w_dq, w_wide)):
            if not old.outputs[0].has_uses() and not old.outputs[0].is_graph_output():
                name = old.outputs[0].name
                graph.erase(old)
                new.outputs[0].name = name  # the report's per-tensor rows name the DQ outputs
        padded.append(conv.name)
    for name in [n for n, v in graph.initializers.items() if not v.has_uses() and not v.is_graph_output()]:
        graph.remove_initializer(name)
    return padded


def _padding(node: Node) -> int | None:
    """Channels to add to a conv's input, or None when it is not such a conv or needs none."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.attr("group", 1) != 1:
        return None
    x_dq, w_dq = (v.producer if v is not None else None for v in node.inputs[:2])
    if not (_is_dq(x_dq) and _is_dq(w_dq) and is_const(w_dq.inputs[0])):
        return None
    q = x_dq.inputs[0].producer
    if q is None or q.op_type != "QuantizeLinear" or not q.inputs[0].is_graph_input():
        return None
    if x_dq.inputs[2].const.numpy().dtype != np.uint8:
        return None  # int8 activations (S8S8) round differently on the two kernels: outputs would move by a step
    w = w_dq.inputs[0]
    if w.const.numpy().dtype != np.int8 or len(w.shape) < 3 or _nonzero(w_dq.inputs[2:]):
        return None  # ConvSym is for symmetric int8 weights
    out_channels, in_channels = w.shape[:2]
    if out_channels < MIN_OUTPUT_CHANNELS or out_channels % OUTPUT_CHANNEL_MULTIPLE or \
            in_channels % CHANNEL_MULTIPLE == 0:
        return None
    return -in_channels % CHANNEL_MULTIPLE


def _is_dq(node: Node | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and len(node.inputs) == 3 and \
        all(is_const(v) for v in node.inputs[1:])


def _nonzero(zero_points) -> bool:
    return any(v is not None and np.any(v.const.numpy()) for v in zero_points)


def _const(graph, array: np.ndarray, hint: str) -> Value:
    name = graph.fresh_name(hint)
    return graph.add_initializer(ArrayTensor(array, name))
