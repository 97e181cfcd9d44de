"""Multi-head attention fusion for onnxruntime: the exporters' attention subgraph -> one op.

Both PyTorch exporters write scaled dot-product attention as::

    Reshape(q, [B, S, heads, head_size]) -> Transpose(0, 2, 1, 3)              (and k: Transpose(0, 2, 3, 1))
    MatMul(q, k^T) -> Mul|Div(scale) -> Add(mask) -> Softmax -> MatMul(., v) -> Transpose(0, 2, 1, 3)

``fuse-attention`` replaces that by ``com.microsoft`` ``MultiHeadAttention(q, k, v, bias, ,
attention_bias)`` followed by a free ``Reshape`` to [B, S, heads, head_size] (what the matched
Transpose gave; the exporter's own Reshape to [B, S, D] still follows, and ``eliminate-noops`` merges
the two when it can prove that safe). The pattern ends at the last Transpose rather than at that
Reshape because exporters sometimes read the Transpose's output twice (GPT-2's TorchScript export
reshapes it once for Gemm and once for a Shape). The scale may also sit on q and k separately
(``sqrt(scale)`` each, as SDPA decompositions write it) or be absent; the mask may be an ``Add`` of any
float tensor that broadcasts to [B, heads, S, T] (BERT's padding mask, GPT-2's causal-and-padding
mask) or a ``Where(cond, scores, -inf)``. A mask known to mask nothing (ViT's dynamo export adds zeros
built at run time, :func:`_no_op_mask`) is dropped; any other becomes ``attention_bias``,
which onnxruntime requires 4-D with exactly [., ., S, T] in its last dims, so a lower-rank mask is
unsqueezed and one whose last dims are not provably S and T is expanded (a copy of one [B, 1, S, T]
tensor per layer). GPT-2's mask thus stays what the exporter computed (causal and padding combined)
instead of becoming ``unidirectional=1``, which would drop the padding part. onnxruntime checks
``attention_bias``'s dims at run time, so a mask that would have broadcast the scores to a bigger
batch (a pathological model) fails loudly instead of computing something else.

A second rule (``mha-bias``) moves the three q/k/v bias Adds into the op's ``bias`` input; a third
(``mha-output-view``) removes that Reshape and the exporter's one after it when the exporter's target
provably is the op's own output shape (dims read from the query's origin, see ``attention_shapes``).
``pack-qkv-attention`` then turns ``MultiHeadAttention`` whose q/k/v are ``MatMul``s of one input by
constant weights into ``com.microsoft`` ``Attention`` with the three weight matrices concatenated
(one GEMM instead of three). This is also the QKV merge: three sibling MatMuls cannot be one pattern
in the rewriter (a pattern has one root), but below the attention op they share a consumer.

Why these ops: ``python tools/measure_attention_ops.py ops --family attention --batch 1 8 --runs 40
--levels all basic`` (onnxruntime 1.32 CPU, 2 threads, spinning off; BERT-base shapes: hidden 768, 12
heads, seq 128; q/k/v projections included, all variants interleaved; median over rounds of the CPU time
relative to the unfused subgraph in the same round: the machine was shared, wall times drifted 2x)::

    batch 8, padding mask              ORT_ENABLE_ALL  ORT_ENABLE_BASIC
    unfused (as exported)                   1.00            1.00
    unfused, q/k/v MatMuls merged + Split   1.02            0.98
    MultiHeadAttention, key_padding_mask    0.95            0.91
    MultiHeadAttention, attention_bias      1.01            0.94
    MHA after one merged q/k/v MatMul       1.03            1.02
    Attention (opset 23)                    0.98            0.92
    com.microsoft Attention, mask_index     0.90            0.89
    com.microsoft Attention, attention_bias 0.88            0.85
    batch 8, no mask: com.microsoft Attention 0.96 / 0.89, MultiHeadAttention 0.97 / 0.91
    batch 8, causal:  Attention(unidirectional) 0.93 / 0.98, MultiHeadAttention 0.98 / 0.99
    batch 1: every form within 0.92-1.05 of the unfused subgraph (noise of this machine)

So packed ``com.microsoft`` ``Attention`` with the exporter's additive mask as ``attention_bias`` is
the target; ``MultiHeadAttention`` is the general intermediate (and what stays where q/k/v are not
three MatMuls of one input, e.g. GPT-2's Gemm + Split). Merging q/k/v MatMuls on their own (without the
attention op) was slower, so it only happens inside ``pack-qkv-attention``. opset-23 ``Attention`` runs
in onnxruntime 1.32 but needs the model's opset raised and was not faster.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Node, TensorType, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, Rule, RuleSet

from .attention_shapes import dim_origin, elements, same_dim, split_heads
from .gelu import bias_vector
from .norm import ShapeAwareRewritePass, scalar, uniform_value

MS = "com.microsoft"
FILL_MIN = -1e30  # a Where fill at least this negative acts like -inf: scores + fill == fill in float32


# ------------------------------------------------------------------------------------------ pattern


def _attention_target(scale: str, mask: str):
    """``scale``: "after" (on q @ k^T), "split" (on q and k^T), "none"; ``mask``: "add", "where", "none"."""

    def target(op, q, k, v, shape_q, shape_k, shape_v, mask_value, cond):
        qh = op.Transpose(op.Reshape(q, shape_q, _name="reshape_q"), perm=[0, 2, 1, 3])
        kt = op.Transpose(op.Reshape(k, shape_k, _name="reshape_k"), perm=[0, 2, 3, 1])
        vh = op.Transpose(op.Reshape(v, shape_v, _name="reshape_v"), perm=[0, 2, 1, 3])
        if scale == "split":
            qh = op.Any(qh, op.const("scale_q"), _ops={"Mul", "Div"}, _commute=True, _name="scale_q_op")
            kt = op.Any(kt, op.const("scale_k"), _ops={"Mul", "Div"}, _commute=True, _name="scale_k_op")
        scores = op.MatMul(qh, kt, _name="qk")
        if scale == "after":
            scores = op.Any(scores, op.const("scale"), _ops={"Mul", "Div"}, _commute=True, _name="scale_op")
        if mask == "add":
            scores = op.Add(scores, mask_value, _commute=True)
        elif mask == "where":
            scores = op.Where(cond, scores, op.const("fill"))
        out = op.MatMul(op.Softmax(scores, _name="softmax"), vh)
        return op.Transpose(out, perm=[0, 2, 1, 3])

    return target


def _scale_factor(node: Node | None, const: Value | None) -> float | str:
    """The factor a ``Mul``/``Div`` by a scalar constant applies (1 when there is none), or why it is not one."""
    if node is None:
        return 1.0
    value = scalar(const)
    if value is None or value == 0:
        return f"{node.label()}: the scale is not a non-zero scalar constant"
    if node.op_type == "Div":
        return 1.0 / value if node.inputs[1] is const else f"{node.label()} divides a constant by the scores"
    return value


def _scale(b: dict) -> float | str:
    """The softmax scale: the product of the factors on q @ k^T, q and k^T."""
    factors = [_scale_factor(b.get(f"{name}_op"), b.get(name)) for name in ("scale", "scale_q", "scale_k")]
    problems = [f for f in factors if isinstance(f, str)]
    return problems[0] if problems else float(np.prod(factors))


def _softmax_last_axis(ctx: MatchContext, softmax: Node) -> str | None:
    axis = softmax.attr("axis", -1 if (ctx.model.opset() or 13) >= 13 else 1)
    return None if axis in (-1, 3) else f"{softmax.label()} normalizes axis {axis}, not the last"


def _mask_problem(mask: Value | None, heads: int) -> str | None:
    if mask is None:
        return None
    if mask.shape is None or len(mask.shape) > 4:
        return f"the rank of the mask {mask.name!r} is not known to be at most 4 (shape {mask.shape})"
    if mask.elem_type not in (1, 9):  # the additive mask (float32) or Where's condition (bool)
        return f"the mask {mask.name!r} has element type {mask.elem_type}"
    if len(mask.shape) == 4 and isinstance(mask.shape[1], int) and mask.shape[1] not in (1, heads):
        return f"the mask's dim 1 ({mask.shape[1]}) is neither 1 nor the number of heads ({heads})"
    if heads == 1 and len(mask.shape) == 4 and mask.shape[1] != 1:
        return "one head and a mask whose dim 1 is not known to be 1: the mask could broadcast the output"
    return None


def _attention_condition(ctx: MatchContext, q: Value, k: Value, v: Value, **b):
    if q.elem_type != 1:
        return f"{q.name!r} is not float32 (elem_type {q.elem_type}): the fused op is float32 only here"
    split = {name: split_heads(b[f"reshape_{name}"], value) for name, value in (("q", q), ("k", k), ("v", v))}
    for why in split.values():
        if isinstance(why, str):
            return why
    if len({(h.num_heads, h.head_size) for h in split.values()}) != 1:
        return f"q, k and v split into different heads: {[(h.num_heads, h.head_size) for h in split.values()]}"
    scale = _scale(b)
    if isinstance(scale, str):
        return scale
    fill = scalar(b.get("fill")) if b.get("fill") is not None else None
    if b.get("cond") is not None and not (fill is not None and fill <= FILL_MIN):
        return f"the Where fill {fill} is not <= {FILL_MIN}: a fully masked row would differ"
    mask = b.get("mask_value") if b.get("mask_value") is not None else b.get("cond")
    # what the replacement needs is what was computed to decide: passed on as extra bindings
    return _softmax_last_axis(ctx, b["softmax"]) or _mask_problem(mask, split["q"].num_heads) or {
        "heads": split["q"], "softmax_scale": scale,
        "no_op_mask": _no_op_mask(mask, b.get("cond") is None, q, k, split["q"].num_heads)}


def _no_op_mask(mask: Value | None, additive: bool, q: Value, k: Value, heads: int) -> bool:
    """Whether the mask changes nothing: an additive one known to be all zeros, or a Where whose condition
    is known to be all true (ViT's dynamo export adds ``Where(Expand(true, [B, 1, S, S]), 0, -inf)`` in
    every layer), and whose dims do not broadcast the scores to a bigger shape. Dropped, it no longer keeps
    onnxruntime's CPU MultiHeadAttention off its flash-attention path, which takes no bias."""
    if mask is None or uniform_value(mask) != (0.0 if additive else 1.0):
        return False
    offset = 4 - len(mask.shape)
    shape = (1,) * offset + tuple(mask.shape)

    def fits(i: int, ref: Value, j: int) -> bool:
        return shape[i] == 1 or (i >= offset and same_dim(mask, i - offset, ref, j))

    return fits(0, q, 0) and shape[1] in (1, heads) and fits(2, q, 1) and fits(3, k, 1)


# ------------------------------------------------------------------------------------------ replacement


def _shape_slice(op, value: Value, start: int, end: int, opset: int) -> Value:
    if opset >= 15:
        return op.Shape(value, start=start, end=end)
    return op.Slice(op.Shape(value), op.const(np.array([start])), op.const(np.array([end])))


def attention_bias(op, mask: Value, q: Value, k: Value, opset: int) -> Value:
    """``mask`` as onnxruntime's ``attention_bias``: 4-D, last two dims exactly [S, T] (it does not
    broadcast those), expanded only when they are not provably S and T already."""
    rank = len(mask.shape)
    if rank < 4:
        axes = list(range(4 - rank))
        type_ = TensorType(mask.elem_type, (1,) * (4 - rank) + tuple(mask.shape))
        mask = (op.Unsqueeze(mask, op.const(np.array(axes)), _type=type_) if opset >= 13
                else op.Unsqueeze(mask, axes=axes, _type=type_))
    if same_dim(mask, 2, q, 1) and same_dim(mask, 3, k, 1):
        return mask
    # S and T read from where q and k got those dims (x, not x @ Wq + bq), so that mha-bias can still
    # remove the bias Adds, and the Shape ops of all layers read the same value.
    (qs, qi), (ks, ki) = dim_origin(q, 1), dim_origin(k, 1)
    target = op.Concat(_shape_slice(op, mask, 0, 2, opset), _shape_slice(op, qs, qi, qi + 1, opset),
                       _shape_slice(op, ks, ki, ki + 1, opset), axis=0)
    return op.Expand(mask, target)


def _attention_replacement(op, q: Value, k: Value, v: Value, ctx: MatchContext, heads, softmax_scale: float,
                           no_op_mask: bool, **b) -> Value:
    opset = ctx.model.opset() or 13
    inputs = [q, k, v]
    mask = None
    if not no_op_mask:
        mask = b.get("mask_value") if b.get("cond") is None else op.Where(
            b["cond"], op.const(np.float32(0)), b["fill"], _type=TensorType(1, b["cond"].shape))
    if mask is not None:
        inputs += [None, None, attention_bias(op, mask, q, k, opset)]
    out = op.MultiHeadAttention(*inputs, _domain=MS, num_heads=heads.num_heads, scale=softmax_scale,
                                _type=TensorType(1, (*q.shape[:2], heads.num_heads * heads.head_size)))
    # [B, S, heads * head_size] -> [B, S, heads, head_size], what the matched Transpose gave; the
    # exporter's own Reshape to [B, S, D] follows (eliminate-noops merges the two; both are free in ORT).
    return op.Reshape(out, op.const(np.array([0, 0, heads.num_heads, heads.head_size], np.int64)),
                      _type=ctx.root.outputs[0])


def _rule_name(scale: str, mask: str) -> str:
    return "mha" + ("" if scale == "after" else f"-{scale}-scale") + ("" if mask == "none" else f"-{mask}-mask")


MHA_RULES = [Rule(_rule_name(scale, mask), _attention_target(scale, mask), _attention_replacement,
                  _attention_condition)
             for scale in ("after", "split", "none") for mask in ("add", "where", "none")]


# ------------------------------------------------------------------------------------------ bias


def _mha_bias_target(op, xq, xk, xv, mask):
    def add(x, name):
        return op.Add(x, op.const(name), _commute=True)

    return op.MultiHeadAttention(add(xq, "bq"), add(xk, "bk"), add(xv, "bv"), None, None, op.opt(mask),
                                 _domain=MS, _name="mha")


def _mha_bias_condition(ctx: MatchContext, xq: Value, xk: Value, xv: Value, bq: Value, bk: Value, bv: Value):
    for x, b in ((xq, bq), (xk, bk), (xv, bv)):
        why = bias_vector(x, b)
        if why:
            return why
    return True


def _mha_bias(op, xq, xk, xv, bq, bk, bv, mask, mha: Node, ctx: MatchContext) -> Value:
    bias = op.const(np.concatenate([b.const.numpy().reshape(-1) for b in (bq, bk, bv)]).astype(np.float32))
    inputs = [xq, xk, xv, bias] + ([None, mask] if mask is not None else [])
    return op.MultiHeadAttention(*inputs, _domain=MS, _type=mha.outputs[0],
                                 **{name: mha.attr(name) for name in mha.attrs})


MHA_BIAS = Rule("mha-bias", _mha_bias_target, _mha_bias, _mha_bias_condition)


# ------------------------------------------------------------------------------------------ output view


def _output_view_target(op, out, split, merge):
    return op.Reshape(op.Reshape(out, op.const("split"), _name="split_heads"), merge, _name="merge_heads")


def _output_view_condition(ctx: MatchContext, out: Value, split: Value, merge: Value, split_heads: Node,
                           merge_heads: Node):
    """The exporter's Reshape back to [B, S, D] after the [B, S, heads, head_size] view the attention
    replacement wrote: both go when the target provably is the attention output's own shape."""
    node = out.producer
    if node is None or node.domain != MS or node.op_type not in ("Attention", "MultiHeadAttention"):
        return "the input of the Reshapes is not a fused attention op's output"
    if out.shape is None or len(out.shape) != 3 or not isinstance(out.shape[2], int):
        return f"{out.name!r} is not known to be [B, S, D] with a known D (shape {out.shape})"
    head_split = [int(v) for v in split.const.numpy().reshape(-1)]
    if head_split[:2] != [0, 0] or split_heads.attr("allowzero", 0):
        return f"{split_heads.label()} does not copy dims 0 and 1 ({head_split})"
    pieces = elements(merge)
    if pieces is None or len(pieces) != 3:
        return f"{merge_heads.label()}: cannot read its target as 3 entries"
    copy_zero = merge_heads.attr("allowzero", 0) == 0
    for k in (0, 1):
        p = pieces[k]
        if not ((p == 0 and copy_zero) or (isinstance(p, tuple) and same_dim(p[0], p[1], out, k))):
            return f"{merge_heads.label()}: cannot prove entry {k} ({p}) is dim {k} of {out.name!r}"
    if pieces[2] not in (out.shape[2], -1):
        return f"{merge_heads.label()}: last entry {pieces[2]} is not the hidden size {out.shape[2]}"
    return True


def _output_view(op, out: Value) -> Value:
    return out


MHA_OUTPUT_VIEW = Rule("mha-output-view", _output_view_target, _output_view, _output_view_condition)


@register_pass
class FuseAttention(ShapeAwareRewritePass):
    name = "fuse-attention"
    description = ("Multi-head attention (Reshape/Transpose, MatMul, scale, mask, Softmax, MatMul) -> "
                   "com.microsoft MultiHeadAttention, q/k/v bias Adds folded in")
    level = "fuse"
    rules = RuleSet([*MHA_RULES, MHA_BIAS, MHA_OUTPUT_VIEW])


# ------------------------------------------------------------------------------------------ packed QKV


def _pack_target(op, x, mask):
    return op.MultiHeadAttention(op.MatMul(x, op.const("wq")), op.MatMul(x, op.const("wk")),
                                 op.MatMul(x, op.const("wv")), op.opt(op.const("bias")), None, op.opt(mask),
                                 _domain=MS, _name="mha")


def _pack_condition(ctx: MatchContext, x: Value, wq: Value, wk: Value, wv: Value, mha: Node):
    shapes = [w.const.shape for w in (wq, wk, wv)]
    if any(len(s) != 2 for s in shapes) or len({s for s in shapes}) != 1:
        return f"the q/k/v weights are not three equal 2-D matrices: {shapes}"
    if x.shape is None or len(x.shape) != 3:
        return f"{x.name!r} is not known to be 3-D (shape {x.shape})"
    if any(w.elem_type != 1 for w in (wq, wk, wv)):
        return "the weights are not float32"
    return True


def _pack(op, x, wq, wk, wv, bias, mask, mha: Node) -> Value:
    weights = np.concatenate([w.const.numpy() for w in (wq, wk, wv)], axis=1)
    b = bias.const.numpy() if bias is not None else np.zeros(weights.shape[1], np.float32)
    inputs = [x, op.const(weights), op.const(b)] + ([None, None, mask] if mask is not None else [])
    attrs = {"num_heads": mha.attr("num_heads"), "scale": mha.attr("scale")}
    return op.Attention(*inputs, _domain=MS, _type=mha.outputs[0], **attrs)


def _pack_gemm_target(op, x, flat, unflat, mask):
    """GPT-2's Conv1D: x [B, S, D] -> Reshape [B*S, D] -> Gemm(W [D, 3D], b) -> Reshape [B, S, 3D] -> Split."""
    gemm = op.Gemm(op.Reshape(x, flat, _name="flatten"), op.const("w"), op.opt(op.const("bias")), _name="gemm")
    q, k, v = op.Split(op.Reshape(gemm, unflat, _name="unflatten"), op.opt(op.const("sizes")), _outputs=3,
                       _name="split")
    return op.MultiHeadAttention(q, k, v, None, None, op.opt(mask), _domain=MS, _name="mha")


def _pack_gemm_condition(ctx: MatchContext, x: Value, w: Value, flatten: Node, unflatten: Node, gemm: Node,
                         split: Node, sizes: Value | None = None):
    if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], int):
        return f"{x.name!r} is not known to be 3-D with a known last dim (shape {x.shape})"
    d = x.shape[2]
    if any(gemm.attr(name, default) != default for name, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0))):
        return f"{gemm.label()} scales or transposes A"
    weight_shape = w.const.shape[::-1] if gemm.attr("transB", 0) else w.const.shape
    if tuple(weight_shape) != (d, 3 * d) or w.elem_type != 1:
        return f"{gemm.label()}: weight of shape {list(w.const.shape)} is not a float32 [{d}, {3 * d}] q/k/v matrix"
    if elements(flatten.inputs[1]) != [-1, d]:
        return f"{flatten.label()} does not flatten [B, S, {d}] to [B*S, {d}]"
    pieces = elements(unflatten.inputs[1])
    lead_ok = pieces is not None and len(pieces) == 3 and all(
        isinstance(p, tuple) and same_dim(p[0], p[1], x, i) or (isinstance(p, int) and p > 0 and x.shape[i] == p)
        for i, p in enumerate(pieces[:2]))
    if not lead_ok or pieces[2] not in (3 * d, -1):
        return f"{unflatten.label()}: cannot prove it restores [B, S, {3 * d}] ({pieces})"
    axis = split.attr("axis", 0)
    if axis not in (2, -1) or (sizes is not None and scalar_list(sizes) != [d, d, d]):
        return f"{split.label()} does not split the last axis in three equal parts"
    return True


def scalar_list(value: Value) -> list[int] | None:
    return [int(v) for v in value.const.numpy().reshape(-1)] if value.const is not None else None


def _pack_gemm(op, x: Value, w: Value, bias: Value | None, mask: Value | None, gemm: Node, mha: Node) -> Value:
    weights = w.const.numpy().T if gemm.attr("transB", 0) else w.const.numpy()
    b = bias.const.numpy().reshape(-1) if bias is not None else np.zeros(weights.shape[1], np.float32)
    if b.size != weights.shape[1]:
        b = np.broadcast_to(b, (weights.shape[1],))
    inputs = [x, op.const(np.ascontiguousarray(weights)), op.const(np.ascontiguousarray(b, np.float32))]
    inputs += [None, None, mask] if mask is not None else []
    return op.Attention(*inputs, _domain=MS, num_heads=mha.attr("num_heads"), scale=mha.attr("scale"),
                        _type=mha.outputs[0])


@register_pass
class PackQkvAttention(ShapeAwareRewritePass):
    name = "pack-qkv-attention"
    description = ("MultiHeadAttention of three MatMuls of one input by constant weights (or of a Split of one "
                   "Gemm, GPT-2's Conv1D) -> com.microsoft Attention with the weights packed (one GEMM)")
    level = "fuse"
    rules = RuleSet([Rule("pack-qkv", _pack_target, _pack, _pack_condition),
                     Rule("pack-qkv-gemm", _pack_gemm_target, _pack_gemm, _pack_gemm_condition)])
