"""Attention fusion (passes/fusion/attention.py) on hand-built attention blocks written the ways the
exporters write them: which rule fires, the structure, numerics in onnxruntime at two shapes (batch and
sequence stay dynamic), and the reason a rule gives when it does not fire."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.fusion import attention
from graphopt.verify import verify_models

D, HEADS, HEAD = 8, 2, 4
F = TensorProto.FLOAT
RNG = np.random.default_rng(0)
WEIGHTS = {n: (RNG.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for n in ("wq", "wk", "wv")}
BIASES = {n: (RNG.standard_normal(D) * 0.1).astype(np.float32) for n in ("bq", "bk", "bv")}


class Block:
    """One self-attention block built node by node (ONNX text cannot say "the same weights" compactly)."""

    def __init__(self, opset: int = 17) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits = [numpy_helper.from_array(a, n) for n, a in {**WEIGHTS, **BIASES}.items()]
        self.inputs = [helper.make_tensor_value_info("x", F, ["batch", "seq", D])]
        self.opset = opset

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def projections(self, bias: bool = True, source: str = "x", prefix: str = "") -> list[str]:
        outs = []
        for p in "qkv":
            y = self.node("MatMul", [source, f"w{p}"], f"{prefix}{p}_mm")
            outs.append(self.node("Add", [f"b{p}", y], f"{prefix}{p}_lin") if bias else y)
        return outs

    def heads(self, value: str, shape: str, perm: list[int], **attrs) -> str:
        return self.node("Transpose", [self.node("Reshape", [value, shape], f"{value}_4d", **attrs)],
                         f"{value}_t", perm=perm)

    def finish(self, probs_input: str, v_heads: str, out_shape: str) -> onnx.ModelProto:
        probs = self.node("Softmax", [probs_input], "probs", axis=-1)
        ctx = self.node("MatMul", [probs, v_heads], "ctx")
        merged = self.node("Transpose", [ctx], "ctx_t", perm=[0, 2, 1, 3])
        out = self.node("Reshape", [merged, out_shape], "attn")
        self.node("MatMul", [out, "wq"], "y")  # a consumer, like the output projection
        seq = self.inputs[0].type.tensor_type.shape.dim[1]
        output = helper.make_tensor_value_info("y", F, ["batch", seq.dim_param or seq.dim_value, D])
        graph = helper.make_graph(self.nodes, "block", self.inputs, [output], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def bert_like(mask: str = "add", scale: str = "mul") -> onnx.ModelProto:
    """Constant head shapes ([0, 0, heads, head]), bias Adds, Mul/Div scale after q @ k^T, additive mask."""
    b = Block()
    q, k, v = b.projections()
    shape = b.const("split_shape", np.array([0, 0, HEADS, HEAD]))
    qh, kt, vh = b.heads(q, shape, [0, 2, 1, 3]), b.heads(k, shape, [0, 2, 3, 1]), b.heads(v, shape, [0, 2, 1, 3])
    scores = b.node("MatMul", [qh, kt], "scores")
    if scale == "mul":
        scores = b.node("Mul", [scores, b.const("scale", np.float32(HEAD ** -0.5))], "scaled")
    elif scale == "div":
        scores = b.node("Div", [scores, b.const("scale", np.float32(HEAD ** 0.5))], "scaled")
    if mask == "add":  # BERT's padding mask from a 0/1 input, [B, 1, 1, S]
        b.inputs.append(helper.make_tensor_value_info("mask", F, ["batch", 1, 1, "seq"]))
        scores = b.node("Add", ["mask", scores], "masked")
    return b.finish(scores, vh, b.const("merge_shape", np.array([0, 0, D])))


def dynamo_like() -> onnx.ModelProto:
    """Head shapes computed from Shape(x) (allowzero=1), the scale on q and k (sqrt each), a Where mask."""
    b = Block(opset=18)
    q, k, v = b.projections(bias=False)
    lead = b.node("Shape", ["x"], "lead", start=0, end=2)
    shape = b.node("Concat", [lead, b.const("tail", np.array([-1, HEAD]))], "split_shape", axis=0)
    qh = b.heads(q, shape, [0, 2, 1, 3], allowzero=1)
    kt = b.heads(k, shape, [0, 2, 3, 1], allowzero=1)
    vh = b.heads(v, shape, [0, 2, 1, 3], allowzero=1)
    root = b.const("root_scale", np.float32(HEAD ** -0.25))
    scores = b.node("MatMul", [b.node("Mul", [qh, root], "q_s"), b.node("Mul", [root, kt], "k_s")], "scores")
    b.inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch", 1, "seq", "seq"]))
    fill = b.const("fill", np.float32(np.finfo(np.float32).min))
    scores = b.node("Where", ["keep", scores, fill], "masked")
    out_shape = b.node("Concat", [lead, b.const("minus_one", np.array([-1]))], "merge_shape", axis=0)
    return b.finish(scores, vh, out_shape)


def feeds(model: onnx.ModelProto, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    out = {"x": rng.standard_normal((batch, seq, D)).astype(np.float32)}
    names = {i.name for i in model.graph.input}
    if "bq" in names:
        out["bq"] = BIASES["bq"]
    keep = np.ones((batch, seq), bool)
    keep[1:, seq // 2:] = False  # right padding on every row but the first
    if "mask" in names:
        out["mask"] = np.where(keep, 0, -10000).astype(np.float32)[:, None, None, :]
    if "keep" in names:
        out["keep"] = np.broadcast_to(keep[:, None, None, :], (batch, 1, seq, seq)).copy()
    return out


def fuse(model: onnx.ModelProto, passes=("fuse-attention",)):
    fused = graphopt.load(model)
    graphopt.optimize(fused, ["lift-constants", *passes, "eliminate-dead-nodes", "remove-unused-initializers"])
    return fused


def check(original: onnx.ModelProto, fused) -> None:
    for batch, seq in ((2, 5), (3, 7)):
        report = verify_models(original, graphopt.to_bytes(fused), inputs=feeds(original, batch, seq))
        assert report.ok, report.summary()


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def only(model, op_type: str):
    (node,) = [n for n in model.graph if n.op_type == op_type]
    return node


def reasons(model, name: str, rules=attention.FuseAttention.rules) -> list[str]:
    return [e.reason for e in rules.explain(model, name) if e.reason]


@pytest.mark.parametrize(("scale", "rule"), [("mul", "mha-add-mask"), ("div", "mha-add-mask"),
                                             ("none", "mha-none-scale-add-mask")])
def test_bert_like_block_to_multi_head_attention_with_bias(scale: str, rule: str):
    original = bert_like(scale=scale)
    fused = fuse(original)
    mha = only(fused, "MultiHeadAttention")
    assert mha.domain == "com.microsoft" and mha.attr("num_heads") == HEADS
    assert mha.attr("scale") == pytest.approx(HEAD ** -0.5 if scale != "none" else 1.0)
    assert mha.metadata["graphopt.rule"] == "mha-bias"  # the q/k/v bias Adds went into the op
    assert [i.name if i is not None else None for i in mha.inputs[:3]] == ["q_mm", "k_mm", "v_mm"]
    assert "Softmax" not in ops(fused) and ops(fused).count("Add") == 0
    check(original, fused)


def test_dynamo_like_block_split_scale_and_where_mask():
    original = dynamo_like()
    fused = fuse(original)
    mha = only(fused, "MultiHeadAttention")
    assert mha.metadata["graphopt.rule"] == "mha-split-scale-where-mask"
    assert mha.attr("scale") == pytest.approx(HEAD ** -0.5)
    check(original, fused)


def test_vit_like_block_without_mask_and_packed_qkv():
    original = bert_like(mask="none", scale="div")
    fused = fuse(original, ("fuse-attention", "pack-qkv-attention"))
    node = only(fused, "Attention")
    assert node.domain == "com.microsoft" and node.metadata["graphopt.rule"] == "pack-qkv"
    assert node.inputs[0].name == "x" and node.inputs[1].const.shape == (D, 3 * D)
    assert ops(fused).count("MatMul") == 1  # only the consumer: q/k/v are one GEMM inside Attention
    check(original, fused)


def test_packed_attention_keeps_the_mask_as_attention_bias():
    original = bert_like()
    fused = fuse(original, ("fuse-attention", "pack-qkv-attention"))
    node = only(fused, "Attention")
    assert len(node.inputs) == 6 and node.inputs[3] is None and node.inputs[5] is not None
    check(original, fused)


def test_mask_without_provable_sequence_dims_is_expanded():
    model = bert_like()
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("mask", F, ["batch", 1, 1, "kv"]))
    fused = fuse(model)
    assert "Expand" in ops(fused)  # dims [., ., 1, kv] are not provably [S, S]
    check(model, fused)


def no_op_mask(form: str, batch_from: str = "x") -> onnx.ModelProto:
    """ViT's dynamo export: a mask that masks nothing, built at run time from the batch size,
    ``Where(Expand(true, [B, 1, S, S]), 0, min)`` added to the scores ("add"), or the expanded condition
    itself as a Where mask ("where"). ``batch_from`` names the input whose dim 0 gives B."""
    b = Block()
    q, k, v = b.projections()
    shape = b.const("split_shape", np.array([0, 0, HEADS, HEAD]))
    qh, kt, vh = b.heads(q, shape, [0, 2, 1, 3]), b.heads(k, shape, [0, 2, 3, 1]), b.heads(v, shape, [0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [qh, kt], "scores"), b.const("scale", np.float32(HEAD ** -0.5))],
                    "scaled")
    if batch_from != "x":
        b.inputs.append(helper.make_tensor_value_info(batch_from, F, ["n", 1]))
    lead = b.node("Shape", [batch_from], "lead", start=0, end=1)
    seq = b.node("Shape", ["x"], "seq_dim", start=1, end=2)
    target = b.node("Concat", [lead, b.const("one", np.array([1])), seq, seq], "mask_shape", axis=0)
    keep = b.node("Expand", [b.const("all_true", np.ones((1, 1, 1, 1), bool)), target], "keep")
    minimum = b.const("fill", np.float32(np.finfo(np.float32).min))
    if form == "add":
        mask = b.node("Where", [keep, b.const("zero", np.float32(0)), minimum], "mask")
        scores = b.node("Add", [scores, mask], "masked")
    else:
        scores = b.node("Where", [keep, scores, minimum], "masked")
    return b.finish(scores, vh, b.const("merge_shape", np.array([0, 0, D])))


@pytest.mark.parametrize("form", ["add", "where"])
def test_mask_that_masks_nothing_is_dropped(form: str):
    original = no_op_mask(form)
    fused = fuse(original, ("fuse-attention", "pack-qkv-attention"))
    node = only(fused, "Attention")
    assert len(node.inputs) == 3  # no attention_bias for onnxruntime to read per head
    assert not {"Where", "Expand"} & set(ops(fused))
    check(original, fused)


def test_mask_of_zeros_that_may_broadcast_the_batch_is_kept():
    """B read from another input: dropping the zeros would drop a broadcast to n rows."""
    original = no_op_mask("add", batch_from="other")
    fused = fuse(original)
    assert only(fused, "MultiHeadAttention").inputs[5] is not None


def test_softmax_on_another_axis_is_refused():
    model = bert_like()
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].i = 2
    fused = fuse(model)
    assert "MultiHeadAttention" not in ops(fused)
    assert any("normalizes axis 2, not the last" in r for r in reasons(fused, "mha-add-mask"))


def test_reshape_that_may_mix_batch_and_sequence_is_refused():
    model = bert_like()
    for init in model.graph.initializer:
        if init.name == "split_shape":  # [-1, 5, heads, head]: dim 1 is 5 only if seq is 5
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 5, HEADS, HEAD]), "split_shape"))
    fused = fuse(model)
    assert "MultiHeadAttention" not in ops(fused)
    assert any("cannot prove it keeps dims 0 and 1" in r for r in reasons(fused, "mha-add-mask"))


def test_where_fill_that_is_not_minus_infinity_is_refused():
    model = dynamo_like()
    for init in model.graph.initializer:
        if init.name == "fill":
            init.CopyFrom(numpy_helper.from_array(np.float32(-10000), "fill"))
    fused = fuse(model)
    assert "MultiHeadAttention" not in ops(fused)
    assert any("Where fill -10000.0 is not <=" in r for r in reasons(fused, "mha-split-scale-where-mask"))


def test_bias_and_packing_negatives_say_why():
    model = bert_like()  # q's bias is an input (overridable), not a constant: it cannot join the op's bias
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "bq"))
    model.graph.input.append(helper.make_tensor_value_info("bq", F, [D]))
    fused = fuse(model)
    assert only(fused, "MultiHeadAttention").metadata["graphopt.rule"] == "mha-add-mask"
    assert any("input 1 of q_lin: expected a constant" in r for r in reasons(fused, "mha-bias"))

    wide = bert_like()  # a [1, 1, D] bias is still per channel: folded
    for init in wide.graph.initializer:
        if init.name == "bq":
            init.CopyFrom(numpy_helper.from_array(BIASES["bq"].reshape(1, 1, D), "bq"))
    fused = fuse(wide)
    assert only(fused, "MultiHeadAttention").metadata["graphopt.rule"] == "mha-bias"
    check(wide, fused)

    cross = bert_like(mask="none")  # k and v read another input: not one packed GEMM
    cross.graph.input.append(helper.make_tensor_value_info("memory", F, ["batch", "seq", D]))
    for node in cross.graph.node:
        if node.output[0] in ("k_mm", "v_mm"):
            node.input[0] = "memory"
    fused = fuse(cross, ("fuse-attention", "pack-qkv-attention"))
    assert "Attention" not in ops(fused) and "MultiHeadAttention" in ops(fused)
    why = reasons(fused, "pack-qkv", attention.PackQkvAttention.rules)
    assert any("x is 'x' elsewhere in the pattern but 'memory' here" in r for r in why), why


def gpt2_like(alpha: float = 1.0) -> onnx.ModelProto:
    """GPT-2's Conv1D: one Gemm over the flattened input, reshaped back and split into q, k, v."""
    b = Block()
    b.inputs[0] = helper.make_tensor_value_info("x", F, ["batch", 5, D])  # static seq: the causal mask is [5, 5]
    b.inits += [numpy_helper.from_array(np.concatenate([WEIGHTS[w] for w in ("wq", "wk", "wv")], axis=1), "w_qkv"),
                numpy_helper.from_array(np.concatenate([BIASES[n] for n in ("bq", "bk", "bv")]), "b_qkv")]
    flat = b.node("Reshape", ["x", b.const("flat_shape", np.array([-1, D]))], "x_2d")
    gemm = b.node("Gemm", [flat, "w_qkv", "b_qkv"], "qkv_2d", alpha=alpha)
    lead = b.node("Shape", ["x"], "lead", start=0, end=2)
    qkv = b.node("Reshape", [gemm, b.node("Concat", [lead, b.const("three_d", np.array([3 * D]))], "qkv_shape",
                                               axis=0)], "qkv")
    b.nodes.append(helper.make_node("Split", [qkv], ["q", "k", "v"], name="split", axis=2, num_outputs=3))
    b.opset = 18
    shape = b.const("split_shape", np.array([0, 0, HEADS, HEAD]))
    qh, kt, vh = b.heads("q", shape, [0, 2, 1, 3]), b.heads("k", shape, [0, 2, 3, 1]), b.heads("v", shape, [0, 2, 1, 3])
    scores = b.node("Mul", [b.node("MatMul", [qh, kt], "scores"), b.const("scale", np.float32(HEAD ** -0.5))],
                    "scaled")
    causal = np.triu(np.full((5, 5), np.finfo(np.float32).min, np.float32), 1)  # static seq 5, rank-2 mask
    scores = b.node("Add", [scores, b.const("causal", causal)], "masked")
    return b.finish(scores, vh, b.const("merge_shape", np.array([0, 0, D])))


def test_gpt2_like_gemm_split_packs_into_attention():
    original = gpt2_like()
    fused = fuse(original, ("fuse-attention", "pack-qkv-attention"))
    node = only(fused, "Attention")
    assert node.metadata["graphopt.rule"] == "pack-qkv-gemm" and node.inputs[0].name == "x"
    assert ops(fused).count("Expand") == 0  # the [5, 5] mask is unsqueezed; its dims are provably S and T
    for batch in (1, 3):
        report = verify_models(original, graphopt.to_bytes(fused), inputs=feeds(original, batch, 5))
        assert report.ok, report.summary()


def test_gemm_packing_refuses_a_scaled_gemm():
    fused = fuse(gpt2_like(alpha=0.5), ("fuse-attention", "pack-qkv-attention"))
    assert "MultiHeadAttention" in ops(fused) and "Attention" not in ops(fused)
    why = reasons(fused, "pack-qkv-gemm", attention.PackQkvAttention.rules)
    assert any("scales or transposes A" in r for r in why), why


def two_layers() -> onnx.ModelProto:
    """Two BERT layers as TorchScript writes them: head shapes and the Reshape back to [B, S, D] computed
    from Shape(layer input), a residual Add + LayerNorm between the layers, a mask of dims [B, 1, 1, kv]
    that must be expanded to [B, 1, S, S]."""
    b = Block()
    b.inputs.append(helper.make_tensor_value_info("mask", F, ["batch", 1, 1, "kv"]))
    gamma, beta = b.const("gamma", np.ones(D, np.float32)), b.const("beta", np.zeros(D, np.float32))
    x = "x"
    for layer in ("l0_", "l1_"):
        q, k, v = b.projections(source=x, prefix=layer)
        lead = b.node("Shape", [x], f"{layer}lead", start=0, end=2)
        shape = b.node("Concat", [lead, b.const(f"{layer}tail", np.array([HEADS, HEAD]))], f"{layer}split", axis=0)
        qh, kt, vh = (b.heads(q, shape, [0, 2, 1, 3]), b.heads(k, shape, [0, 2, 3, 1]),
                      b.heads(v, shape, [0, 2, 1, 3]))
        scores = b.node("Div", [b.node("MatMul", [qh, kt], f"{layer}scores"), b.const(f"{layer}scale",
                                                                                        np.float32(HEAD ** 0.5))],
                        f"{layer}scaled")
        probs = b.node("Softmax", [b.node("Add", [scores, "mask"], f"{layer}masked")], f"{layer}probs", axis=-1)
        ctx = b.node("Transpose", [b.node("MatMul", [probs, vh], f"{layer}ctx")], f"{layer}ctx_t", perm=[0, 2, 1, 3])
        merge = b.node("Concat", [lead, b.const(f"{layer}hidden", np.array([D]))], f"{layer}merge", axis=0)
        attn = b.node("Reshape", [ctx, merge], f"{layer}attn")
        residual = b.node("Add", [b.node("MatMul", [attn, "wv"], f"{layer}proj"), x], f"{layer}residual")
        x = b.node("LayerNormalization", [residual, gamma, beta], f"{layer}out", axis=-1)
    graph = helper.make_graph(b.nodes, "layers", b.inputs, [helper.make_tensor_value_info(x, F, ["batch", "seq", D])],
                              b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_layers_share_one_expanded_mask_and_lose_the_output_reshapes():
    original = two_layers()
    fused = fuse(original, ("fuse-attention", "pack-qkv-attention", "eliminate-common-subexpressions"))
    assert ops(fused).count("Attention") == 2
    assert ops(fused).count("Expand") == 1  # S of layer 1 traced through the residual Add to x: one mask
    assert "Reshape" not in ops(fused)  # [B, S, heads, head] and back: both views go (mha-output-view)
    assert all(n.inputs[0].producer.op_type == "Attention" for n in fused.graph if n.name.endswith("proj"))
    check(original, fused)


def test_output_view_refuses_a_target_read_from_another_tensor():
    model = two_layers()
    model.graph.input.append(helper.make_tensor_value_info("other", F, ["b2", "s2", D]))
    for node in model.graph.node:
        if node.output[0] == "l1_merge":  # [B, S] of `other`: not provably the attention output's
            node.input[0] = "other_lead"
    model.graph.node.insert(0, helper.make_node("Shape", ["other"], ["other_lead"], start=0, end=2))
    fused = fuse(model)
    assert ops(fused).count("Reshape") == 2  # layer 0's views went, layer 1's stayed
    why = reasons(fused, "mha-output-view")
    assert any("cannot prove entry 0" in r for r in why), why
