"""The layouts onnxruntime's int8 CPU kernels want, written into the QDQ model. Both rewrites change no
output value (tests compare them bit for bit).

**Input channels padded.** On x86, onnxruntime runs a QLinearConv with symmetric int8 weights (ours) through
MLAS's ``ConvSym`` kernels (AVX2, AVX-VNNI, AVX-512 VNNI) only when its input channels are a multiple of 4 and
its output channels at least 16 and a multiple of 4 (``MlasConvSymPackWSize``); any other conv falls back to
an im2col + int8 GEMM. An image model's stem reads 3 channels (a digits model's, 1), so it always fell back.
The quantized image gets zero-point channels (a uint8 ``Pad`` between the input's QuantizeLinear and the
conv's own DequantizeLinear, so other readers of the input are unchanged) and the int8 weights zero input
channels: the small ResNet's stem took 44 instead of 80 us (onnxruntime's profile, AVX-512 VNNI). Whether it
pays is timed (``api._first_layers``): on the digits CNN's 8x8 image the extra node cost more than it saved.

**Flatten in channels-last order.** onnxruntime runs QLinearConv, max-pooling and global average pooling in
NHWC and puts a Transpose back to NCHW in front of the first op that needs the layout, the classifier's
Flatten: a uint8 transpose of the activation (6.7 of the digits CNN's 31 us, profile). Flattening NHWC gives
the same values in another order, so the classifier's weights are permuted to match and a
``Transpose(0, 2, 3, 1)`` goes before the Flatten, in the int8 domain (its Q/DQ share the scale), which
onnxruntime cancels against its own. The digits CNN ran 0.95x the time; a 1x1 pooled tail (ResNet,
MobileNet) loses its Transpose with no weight change at all.
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
        _replace_weight(graph, conv, w_dq, wide, "padded")
        if not x_dq.outputs[0].has_uses() and not x_dq.outputs[0].is_graph_output():
            name = x_dq.outputs[0].name
            graph.erase(x_dq)
            dq.outputs[0].name = name  # the report's per-tensor rows name the DQ outputs
        padded.append(conv.name)
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


#: int8 ops onnxruntime's NHWC transformer runs channels-last (their Q is fused into them)
CHANNELS_LAST = {"Conv", "MaxPool", "GlobalAveragePool", "AveragePool"}


def flatten_channels_last(model: Model) -> list[str]:
    """Rewrite every int8 Flatten -> Gemm/MatMul fed by a channels-last op; returns the Flattens' outputs,
    whose values are now in (h, w, c) order."""
    graph = model.graph
    done = []
    for flat in list(graph):
        found = _match(flat)
        if found is None:
            continue
        dq, linear, w_dq, (channels, height, width) = found
        scale, zero_point = dq.inputs[1], dq.inputs[2]
        nhwc = Node("Transpose", [dq.outputs[0]], {"perm": [0, 2, 3, 1]},
                    outputs=[graph.fresh_name(f"{flat.name}_nhwc")], name=graph.fresh_name(f"{flat.name}_nhwc"))
        q = Node("QuantizeLinear", [nhwc.outputs[0], scale, zero_point],
                 outputs=[graph.fresh_name(f"{flat.name}_nhwc_q")], name=graph.fresh_name(f"{flat.name}_nhwc_q"))
        back = Node("DequantizeLinear", [q.outputs[0], scale, zero_point],
                    outputs=[graph.fresh_name(f"{flat.name}_nhwc_dq")], name=graph.fresh_name(f"{flat.name}_nhwc_dq"))
        graph.insert_before(flat, [nhwc, q, back])
        flat.set_input(0, back.outputs[0])
        if height * width > 1:
            _permute_weight(graph, linear, w_dq, channels, height, width)
        done.append(flat.outputs[0].name)
    return done


def _match(flat: Node) -> tuple[Node, Node, Node, tuple[int, int, int]] | None:
    """(the Flatten's input DQ, the Gemm/MatMul, its weight DQ, (C, H, W)) when ``flat`` qualifies."""
    if flat.op_type not in ("Flatten", "Reshape") or flat.domain not in ("", "ai.onnx"):
        return None
    dq = flat.inputs[0].producer
    q = dq.inputs[0].producer if _is_dq(dq) else None
    source = q.inputs[0] if q is not None and q.op_type == "QuantizeLinear" else None
    if source is None or source.producer is None or source.producer.op_type not in CHANNELS_LAST or \
            not _reads_int8(source.producer):
        return None
    shape = source.shape  # the float value's (Q/DQ outputs carry no shape)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or \
            not _flattens_to_2d(flat, shape):
        return None
    linear = _int8_linear_reading(flat.outputs[0])
    if linear is None:
        return None
    node, w_dq = linear
    return dq, node, w_dq, tuple(shape[1:])


def _flattens_to_2d(node: Node, shape: tuple) -> bool:
    """Flatten(axis=1), or a Reshape of the [N, C, H, W] ``shape`` to [N, C*H*W]."""
    if node.op_type == "Flatten":
        return node.attr("axis", 1) == 1
    if not is_const(node.inputs[1]):
        return False
    target = [int(d) for d in node.inputs[1].const.numpy().reshape(-1)]
    features = int(np.prod(shape[1:]))
    return len(target) == 2 and target[1] in (-1, features) and (target[0] in (-1, 0) or target[0] == shape[0])


def _int8_linear_reading(value: Value) -> tuple[Node, Node] | None:
    """The Gemm/MatMul (and its int8 weight's DQ) that alone reads ``value`` through one Q/DQ pair."""
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    q = value.users()[0]
    if q.op_type != "QuantizeLinear" or len(q.outputs[0].uses()) != 1:
        return None
    dq = q.outputs[0].users()[0]
    if not _is_dq(dq) or len(dq.outputs[0].uses()) != 1:
        return None
    node, index = dq.outputs[0].uses()[0]
    if index != 0 or node.op_type not in ("Gemm", "MatMul") or node.attr("transA", 0):
        return None
    w_dq = node.inputs[1].producer
    if not _is_dq(w_dq) or not is_const(w_dq.inputs[0]) or len(w_dq.inputs[0].shape) != 2:
        return None
    return node, w_dq


def _permute_weight(graph, linear: Node, w_dq: Node, channels: int, height: int, width: int) -> None:
    """Reorder the weight's input features from (c, h, w) to (h, w, c) order."""
    order = np.arange(channels * height * width).reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)
    w = w_dq.inputs[0].const.numpy()
    by_columns = linear.op_type == "Gemm" and linear.attr("transB", 0)
    _replace_weight(graph, linear, w_dq, w[:, order] if by_columns else w[order, :], "nhwc")


def _replace_weight(graph, node: Node, w_dq: Node, array: np.ndarray, tag: str) -> None:
    """``node`` reads ``array`` (int8, same scales and zero points) through a DequantizeLinear of its own; the
    old one and its constant go when nothing else reads them (a shared weight keeps its other readers)."""
    attrs = {"axis": w_dq.attr("axis")} if w_dq.attr("axis") is not None else {}
    weight = _const(graph, array, f"{w_dq.inputs[0].name}_{tag}")
    new_dq = Node("DequantizeLinear", [weight, *w_dq.inputs[1:]], attrs,
                  outputs=[graph.fresh_name(f"{weight.name}_dq")], name=graph.fresh_name(f"{weight.name}_dq"))
    graph.insert_before(node, new_dq)
    node.set_input(1, new_dq.outputs[0])
    if not w_dq.outputs[0].has_uses():
        old = w_dq.inputs[0]
        graph.erase(w_dq)
        if not old.has_uses() and not old.is_graph_output():
            graph.remove_initializer(old.name)


def _reads_int8(node: Node) -> bool:
    """The op is quantized: onnxruntime fuses it into an int8 kernel when its data input comes through a DQ."""
    return node.inputs[0] is not None and node.inputs[0].producer is not None and \
        node.inputs[0].producer.op_type == "DequantizeLinear"
