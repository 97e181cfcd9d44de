"""A post-LN block's output bias carried in the residual stream (passes/fusion/residual.py), checked against
onnxruntime running the original."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphopt.passes.fusion.residual import FoldResidualBias
from tests.passes.test_fusion_support import assert_same_outputs, model_from, not_fired, ops, optimized, rand

# embeddings LayerNorm, an attention block and an FFN block, each ending in bias Add + residual + LayerNorm
POST_LN = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[N, 8, 32] e, float[N, 1, 8, 8] mask) => (float[N, 8, 32] y) {
    x0 = LayerNormalization <axis = -1> (e, g0, BETA0)
    a = com.microsoft.Attention <num_heads = 4> (x0, wqkv, bqkv, "", "", mask)
    p = MatMul(a, wo)
    pb = Add(bo, p)
    s1 = Sum(pb, x0)
    x1 = LayerNormalization <axis = -1> (s1, g1, be1)
    h = MatMul(x1, w1)
    act = com.microsoft.GELU
    o = MatMul(act, w2)
    ob = Add(o, b2)
    s2 = Add(x1, ob)
    y = LayerNormalization (s2, g2, be2)
}
"""
GELU_WITH_BIAS = "BiasGelu(h, b1)"
FEEDS = {"e": rand(2, 8, 32, seed=10), "mask": np.where(np.arange(8) < 6, 0.0, -1e4).astype(np.float32)
         * np.ones((2, 1, 8, 1), np.float32)}


def _block(text: str = POST_LN, gelu: str = GELU_WITH_BIAS, beta0: bool = True):
    weights = {"g0": rand(32, seed=1, low=0.5, high=1.5), "wqkv": rand(32, 96, seed=2, low=-0.3, high=0.3),
               "bqkv": rand(96, seed=3), "wo": rand(32, 32, seed=4, low=-0.3, high=0.3), "bo": rand(32, seed=5),
               "g1": rand(32, seed=6, low=0.5, high=1.5), "be1": rand(32, seed=7),
               "w1": rand(32, 64, seed=8, low=-0.3, high=0.3), "b1": rand(64, seed=9),
               "w2": rand(64, 32, seed=11, low=-0.3, high=0.3), "b2": rand(32, seed=12),
               "g2": rand(32, seed=13), "be2": rand(32, seed=14)}
    if beta0:
        weights["be0"] = rand(32, seed=15)
    text = text.replace("BETA0", "be0" if beta0 else "").replace("GELU", gelu)
    return model_from(text.replace('(e, g0, )', '(e, g0)'), {k: v for k, v in weights.items() if k in text})


def _bias_adds(model) -> list:
    return [n for n in model.graph if n.op_type == "Add" and any(v.const is not None for v in n.inputs)]


@pytest.mark.parametrize(("gelu", "beta0"), [(GELU_WITH_BIAS, True), (GELU_WITH_BIAS, False),
                                             ("FastGelu(h, b1)", True), ("FastGelu(h)", True)])
def test_both_blocks_lose_their_bias_add_and_match(gelu, beta0):
    proto = _block(gelu=gelu, beta0=beta0)
    model = optimized(proto, ["fold-residual-bias"])
    assert _bias_adds(model) == []
    assert ops(model) == ["LayerNormalization", "Attention", "MatMul", "Sum", "LayerNormalization", "MatMul",
                          gelu.split("(")[0], "MatMul", "Add", "LayerNormalization"]
    first, second, _ = (n for n in model.graph if n.op_type == "LayerNormalization")
    assert len(first.inputs) == 3 and len(second.inputs) == 3  # a missing beta is created to carry the bias
    gelu_node = next(n for n in model.graph if n.op_type == gelu.split("(")[0])
    assert len(gelu_node.inputs) == 2  # FastGelu without a bias gains one
    assert_same_outputs(proto, model, FEEDS)


def test_the_last_layernorm_keeps_its_beta():
    proto = _block()
    model = optimized(proto, ["fold-residual-bias"])
    last = [n for n in model.graph if n.op_type == "LayerNormalization"][-1]
    expected = next(t for t in proto.graph.initializer if t.name == "be2")
    assert last.inputs[2].name == "be2" and np.array_equal(last.inputs[2].const.numpy(),
                                                           np.frombuffer(expected.raw_data, np.float32))


def test_a_layernorm_output_read_outside_the_block_is_not_shifted():
    text = POST_LN.replace("=> (float[N, 8, 32] y)", "=> (float[N, 8, 32] y, float[N, 8, 32] r)").replace(
        "    h = MatMul", "    r = Relu(x1)\n    h = MatMul")
    model = optimized(_block(text), ["fold-residual-bias"])
    assert len(_bias_adds(model)) == 1  # the attention block still folds; the FFN's input is read by Relu
    why = not_fired(_block(text.replace("s1 = Sum(pb, x0)", "s1 = Sum(p, x0)")), FoldResidualBias,
                    "residual-bias-ffn")
    assert "also read by" in why and "Relu" in why


def test_a_layernorm_output_that_is_a_graph_output_is_not_shifted():
    text = POST_LN.replace("=> (float[N, 8, 32] y)", "=> (float[N, 8, 32] y, float[N, 8, 32] x1)").replace(
        "s1 = Sum(pb, x0)", "s1 = Sum(p, x0)")
    why = not_fired(_block(text), FoldResidualBias, "residual-bias-ffn")
    assert "graph output" in why


def test_a_pre_ln_block_is_left_alone():
    pre_ln = """
    <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (float[N, 8, 32] e) => (float[N, 8, 32] y) {
        x1 = LayerNormalization <axis = -1> (e, g1, be1)
        h = MatMul(x1, w1)
        act = com.microsoft.BiasGelu(h, b1)
        o = MatMul(act, w2)
        ob = Add(o, b2)
        y = Add(e, ob)
    }
    """
    proto = model_from(pre_ln, {"g1": rand(32, seed=1), "be1": rand(32, seed=2), "w1": rand(32, 64, seed=3),
                                "b1": rand(64, seed=4), "w2": rand(64, 32, seed=5), "b2": rand(32, seed=6)})
    why = not_fired(proto, FoldResidualBias, "residual-bias-ffn")
    assert "expected the output of LayerNormalization" in why


def test_a_bias_over_more_than_the_hidden_axis_is_refused():
    proto = _block()
    for tensor in proto.graph.initializer:
        if tensor.name == "b2":  # one value per position and unit: not a shift of the stream
            tensor.CopyFrom(onnx.numpy_helper.from_array(rand(8, 32, seed=3), "b2"))
    model = optimized(proto, ["fold-residual-bias"])
    assert [n.inputs[1].name for n in _bias_adds(model)] == ["b2"]
    assert_same_outputs(proto, model, FEEDS)
