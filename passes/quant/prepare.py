"""Rewrites that let more of a model run in int8: a spatial ReduceMean becomes a GlobalAveragePool.

PyTorch's dynamo exporter writes ``AdaptiveAvgPool2d(1)`` as ``ReduceMean(axes=[-1, -2])``; onnxruntime
has no int8 ReduceMean, so the int8 convolutions before it (in NHWC) had to be transposed back and
dequantized, while QLinearGlobalAveragePool stays in int8 NHWC. Exact in float.
"""

from __future__ import annotations

from graphopt.ir import Model, Node, TensorType

from .plan import is_const


def spatial_means_to_pooling(model: Model) -> int:
    graph = model.graph
    changed = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not _over_spatial_axes(node):
            continue
        x, out = node.inputs[0], node.outputs[0]
        pool = Node("GlobalAveragePool", [x], outputs=[graph.fresh_name(f"{out.name}_pool")],
                    name=graph.fresh_name(f"{node.name}_pool"))
        graph.insert_before(node, pool)
        new = pool.outputs[0]
        if x.elem_type:
            new.type = TensorType(x.elem_type, (*x.shape[:2], 1, 1))  # later layout rewrites read its dims
        if not node.attr("keepdims", 1):
            flat = Node("Flatten", [new], {"axis": 1}, outputs=[graph.fresh_name(f"{out.name}_flat")],
                        name=graph.fresh_name(f"{node.name}_flatten"))
            graph.insert_before(node, flat)
            new = flat.outputs[0]
        name, value_type = out.name, out.type
        out.replace_all_uses_with(new, include_graph_outputs=True)
        graph.erase(node)
        new.name, new.type = name, value_type
        changed += 1
    return changed


def _over_spatial_axes(node: Node) -> bool:
    """True for a mean over exactly the last two axes of a 4-D input."""
    shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    if shape is None or len(shape) != 4:
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        if not is_const(node.inputs[1]):
            return False
        axes = [int(a) for a in node.inputs[1].const.numpy().reshape(-1)]
    else:
        axes = node.attr("axes", None)
        if axes is None:
            return False
    return sorted(a % 4 for a in axes) == [2, 3]
