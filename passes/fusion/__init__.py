"""Operator fusions for runtimes (level "fuse"): rewrite rules that introduce fused ops.

Import order is pipeline order: Conv/Gemm folding before the activation and
Transpose rewrites that may expose more of it.
"""

from . import activation, conv, linear, transpose  # noqa: F401
