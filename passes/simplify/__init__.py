"""Lossless simplification passes: shape inference, constant and shape folding, control-flow inlining,
no-op elimination, common subexpressions.

Importing this package registers its passes (in pipeline order).
"""

from . import infer, fold, shape_fold, control_flow, noop, cse  # noqa: F401, I001 - registration order is pipeline order
