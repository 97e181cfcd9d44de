"""Pad a transformer FFN's inner width off a multiple of 4 KiB, so its second GEMM reads rows that do not alias.

onnxruntime's CPU GEMM (MLAS) reads the activation matrix ``A`` of ``A @ W`` in place, row by row, several
rows at a time. When a row is a multiple of 4 KiB long (``K`` a multiple of 1024 float32), those rows
start at addresses that map to the same L1 cache sets, and the kernel thrashes them. The FFN's second
MatMul of every BERT/ViT/GPT-2-size model has ``K = 3072``. Measured here (onnxruntime 1.32, 2 threads,
AVX-512 VM, one MatMul with a constant [K, 768] weight, interleaved, paired medians):

    A rows x K        K = 1024 | 1040     2048 | 2064     3072 | 3088     1536 | 1552
    128               1.00 | 0.90      1.00 | 0.90      1.00 | 0.90      1.00 | 1.01
    197 (ViT, b1)                                        1.00 | 0.70
    1024 (batch 8)                                       1.00 | 0.87

16 more columns (one cache line) take 10-30 % off the GEMM although it does 0.5 % more work; 1536-float
rows (6 KiB) do not alias. BERT-base's whole FFN (MatMul, BiasGelu, MatMul; ``python
tools/measure_attention_ops.py ops --family ffn``) ran 0.83x at batch 1 and 0.89x at batch 8 padded by 16,
with bit-identical outputs. The rule pads the FFN's inner width where it is produced: 16 zero columns in
the first projection's weight (and zeros in its bias), so the activation between the two projections has
16 columns of ``act(0)``, and 16 zero rows in the second projection's weight, which keep them out of the
result. The model stays standard ONNX with the same outputs (exactly: the extra terms are products with
zero), 0.5 % larger in the FFN weights.

Pass ``pad-aliased-ffn`` (level "fuse"): ``MatMul(act(MatMul(a, W1) [, b]), W2)`` with constant float32 2-D
weights, ``W1``'s columns = ``W2``'s rows a multiple of :data:`ALIAS_FLOATS`, and ``act`` one of the GELU
forms the fusions leave (``BiasGelu``/``FastGelu`` with the bias, ``Gelu``, ``QuickGelu``) or Relu.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import TensorType, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet

from .channels import const_array, copy_attrs

MS = "com.microsoft"
#: float32 elements in 4 KiB: rows this long (or a multiple) alias in L1
ALIAS_FLOATS = 1024
#: columns added: one 64-byte cache line of float32 (3088 ran faster than 3104 or 3136 above)
PAD = 16


def _condition(ctx: MatchContext, w1: Value, w2: Value, b: Value | None = None) -> bool | str:
    first, second = const_array(w1), const_array(w2)
    if first.dtype != np.float32 or second.dtype != np.float32:
        return "only float32 weights (the 4 KiB alias is measured for float32 rows)"
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[0]:
        return "the projections are not [D, K] and [K, N] weights"
    width = second.shape[0]
    if width % ALIAS_FLOATS:
        return f"the inner width {width} is not a multiple of {ALIAS_FLOATS}: its rows do not alias"
    if b is not None and const_array(b).shape != (width,):
        return f"the bias has shape {list(const_array(b).shape)}, expected [{width}]"
    shared = [v.name for v in (w1, b, w2) if v is not None and len(v.uses()) > 1]
    if shared:  # layers sharing weights (ALBERT) would each get a padded copy
        return f"{', '.join(shared)} also read elsewhere: padding would copy it"
    return True


def _widened(value: Value) -> TensorType | None:
    """``value``'s type with PAD more elements on the last axis (None when its shape is unknown)."""
    vtype = value.type
    if not isinstance(vtype, TensorType) or not vtype.shape or not isinstance(vtype.shape[-1], int):
        return None
    return TensorType(vtype.elem_type, (*vtype.shape[:-1], vtype.shape[-1] + PAD))


def _rule(name: str, ops: frozenset[str], domain: str, with_bias: bool) -> Rule:
    def activation(op, inner, *bias):
        return op.Any(inner, *bias, _ops=ops, _domain=domain, _name="act")

    def with_b(op, a, w1, w2, b):
        return op.MatMul(activation(op, op.MatMul(a, op.const("w1"), _name="mm1"), op.const("b")), op.const("w2"))

    def without_b(op, a, w1, w2):
        return op.MatMul(activation(op, op.MatMul(a, op.const("w1"), _name="mm1")), op.const("w2"))

    def replacement(op, a, w1, w2, mm1, act, ctx, b=None):  # the rewriter passes ``b`` only where bound
        first = op.MatMul(a, op.const(np.pad(const_array(w1), [(0, 0), (0, PAD)]), name=f"{w1.name}_padded"),
                          _type=_widened(mm1.outputs[0]))
        bias = [] if b is None else [op.const(np.pad(const_array(b), (0, PAD)), name=f"{b.name}_padded")]
        hidden = getattr(op, act.op_type)(first, *bias, _domain=domain, _type=_widened(act.outputs[0]),
                                          **copy_attrs(act))
        second = op.const(np.pad(const_array(w2), [(0, PAD), (0, 0)]), name=f"{w2.name}_padded")
        return op.MatMul(hidden, second, _type=ctx.root.outputs[0])

    return Rule(name, with_b if with_bias else without_b, replacement, _condition)


PAD_FFN_RULES = RuleSet([
    _rule("pad-ffn-bias-gelu", frozenset({"BiasGelu", "FastGelu"}), MS, with_bias=True),
    _rule("pad-ffn-gelu", frozenset({"Gelu", "QuickGelu", "FastGelu"}), MS, with_bias=False),
    _rule("pad-ffn-onnx-activation", frozenset({"Gelu", "Relu"}), "", with_bias=False),
])


@register_pass
class PadAliasedFfn(RewritePass):
    name = "pad-aliased-ffn"
    description = ("Pad a transformer FFN's inner width 3072 (any multiple of 1024) by 16 zero columns: the second "
                   "GEMM then reads rows that do not alias in the CPU's L1 cache (10-30 % faster in onnxruntime)")
    level = "fuse"
    lossless = True
    rules = PAD_FFN_RULES
