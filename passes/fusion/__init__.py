"""Operator fusions for runtimes (level "fuse"): rewrite rules that introduce fused ops.

Import order is pipeline order: the transformer fusions (normalization, GELU, attention) run before MatMul+Add
-> Gemm and Transpose sinking, which would otherwise rewrite parts of the attention pattern; Conv/Gemm folding
comes before the activation and Transpose rewrites that may expose more of it; the FFN padding (``stride``)
needs the GELU forms the fusions leave, and so does moving a post-LN block's bias into its residual stream
(``residual``). The NCHWc layout (``--target-runtime ort-cpu`` only) comes last: it
consumes the Convs the other rules produced.
"""

from . import norm, gelu, attention, activation, conv, linear, transpose, stride, residual, reduce, nchwc  # noqa: F401, I001 - order
