"""A weighted sum over the next-to-last axis as a MatMul (passes/fusion/reduce.py), checked against onnxruntime
running the original."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.fusion.reduce import WeightedSumToMatMul
from tests.passes.test_fusion_support import assert_same_outputs, model_from, ops, optimized, rand, reason

# sentence-transformers' mean pooling: token vectors weighted by the mask, summed over the sequence
POOLING = """
<ir_version: 8, opset_import: ["" : OPSET]>
g (float[N, S, 16] h, int64[N, S] mask) => (float[N, OUT] y) {
    axis = Constant <value = int64[1] {-1}> ()
    m = Unsqueeze(mask, axis)
    w = Cast <to = 1> (m)
    p = Mul(h, w)
    REDUCE
}
"""
FEEDS = {"h": rand(3, 7, 16, seed=1), "mask": (np.arange(7) < np.array([[7], [4], [1]])).astype(np.int64)}


def _pooling(axes: int = 1, keepdims: int = 0, out: str = "N, 16", mask: str = "N, S", mul: str = "h, w") -> object:
    reduce = (f"axes = Constant <value = int64[1] {{{axes}}}> ()\n"
              f"    y = ReduceSum <keepdims = {keepdims}> (p, axes)")
    text = POOLING.replace("OPSET", "17").replace("Mul(h, w)", f"Mul({mul})").replace("N, OUT", out)
    return model_from(text.replace("N, S] mask", f"{mask}] mask").replace("REDUCE", reduce))


@pytest.mark.parametrize(("axes", "keepdims", "out", "mul"), [
    (1, 0, "N, 16", "h, w"), (-2, 0, "N, 16", "h, w"), (1, 1, "N, 1, 16", "h, w"), (1, 0, "N, 16", "w, h")])
def test_mean_pooling_sum_becomes_a_matmul_and_matches(axes, keepdims, out, mul):
    proto = _pooling(axes, keepdims, out, mul=mul)
    model = optimized(proto, ["weighted-sum-to-matmul"])
    assert "ReduceSum" not in ops(model) and "Mul" not in ops(model)
    assert ops(model)[-2:] == (["Transpose", "MatMul"] if keepdims else ["MatMul", "Squeeze"])
    assert_same_outputs(proto, model, FEEDS)


def test_opset_11_reads_axes_from_the_attribute():
    unsqueeze = "axis = Constant <value = int64[1] {-1}> ()\n    m = Unsqueeze(mask, axis)"
    text = POOLING.replace("OPSET", "11").replace("OUT", "16").replace(unsqueeze, "m = Unsqueeze <axes = [-1]> (mask)")
    text = text.replace("REDUCE", "y = ReduceSum <keepdims = 0, axes = [1]> (p)")
    proto = model_from(text)
    model = optimized(proto, ["weighted-sum-to-matmul"])
    squeeze = next(n for n in model.graph if n.op_type == "Squeeze")
    assert squeeze.attr("axes") == [1]
    assert_same_outputs(proto, model, FEEDS)


def test_a_sum_over_another_axis_is_left_alone():
    assert "does not sum axis 1 alone" in _refusal(_pooling(axes=2, out="N, S"))


def test_weights_broadcast_along_the_summed_axis_are_refused():
    assert "not provably the same length" in _refusal(_pooling(mask="N, 1"))


def _refusal(proto) -> str:
    """Why the rule refuses the model's one ReduceSum, with shapes inferred as the pass sees them."""
    model = optimized(proto, ["infer-shapes"])
    assert WeightedSumToMatMul.rules.apply(model) == {}
    return reason(model, WeightedSumToMatMul, "weighted-sum-matmul")
