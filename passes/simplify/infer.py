"""infer-shapes: fill value types from onnx's shape inference and onnxruntime's symbolic one.

The inference and the dim-by-dim merge live in :mod:`graphopt.shapes` (shared with every pass that reads
types); this pass runs them with symbolic inference on, and only when something may have become
inferable since the model's last inference (see :func:`graphopt.shapes.ensure_shapes`).
"""

from __future__ import annotations

from graphopt.ir import Model
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass
from graphopt.shapes import SYMBOLIC_MAX_NODES, ensure_shapes


@register_pass
class InferShapes(Pass):
    name = "infer-shapes"
    description = "Fill value types from onnx shape inference (data propagation) and symbolic inference"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(ensure_shapes(
            model, symbolic=bool(ctx.option(self.name, "symbolic", True)),
            symbolic_max_nodes=int(ctx.option(self.name, "symbolic_max_nodes", SYMBOLIC_MAX_NODES))))
