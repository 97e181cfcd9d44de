"""Carry a post-LN residual block's output bias in the residual stream, where it costs nothing.

A post-LN transformer block (BERT, MiniLM) ends in ``LN(x + (P(f(x)) + b))``: the output projection ``P``,
its bias ``b`` as an Add over the whole [batch, seq, hidden] activation, then the residual Sum. Its input
``x`` is the previous LayerNorm's output, read by the residual Sum and by the block's first projection
(the packed ``Attention``, or the FFN's MatMul whose bias the fused GELU adds). With ``x' = x + b``:

- the previous LayerNorm makes ``x'`` by itself: its ``beta`` becomes ``beta + b``;
- the first projection reads ``x'``: ``x' W + (c - b W) = x W + c``, so its bias becomes ``c - b W``;
- the residual Sum reads ``x' + P(f(x))``, which is ``x + P(f(x)) + b``: the Add is gone.

Both new biases are added by ops that add a bias anyway, so each block loses a full pass over its output.
MiniLM TorchScript (onnxruntime 1.32, 2 threads, ORT_ENABLE_ALL, paired with the fused model before this
pass, 30 s a batch size): the twelve Adds took 0.36 of 19.7 ms of kernel time at batch 1 in the profile; the model went
from 0.965x to 0.958x the original's CPU time at batch 1 and from 0.984x to 0.975x at batch 8.

Pass ``fold-residual-bias`` (level "fuse"), rules ``residual-bias-attention`` (the packed ``Attention`` of
``pack-qkv-attention``) and ``residual-bias-ffn`` (MatMul, ``BiasGelu``/``FastGelu``, MatMul). Refused where
``x`` is a graph output or is read by anything but the block and ``Shape``s (they would see the shift),
where the LayerNorm does not normalize the last axis alone, or where ``b`` is not one value per hidden
unit. Pre-LN blocks (GPT-2, ViT) read ``x`` through a LayerNorm, which a shift does not pass through.
Outputs differ by float rounding only: the bias reaches the sum by another path.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Node, Value
from graphopt.pipeline import register_pass
from graphopt.rewrite import MatchContext, RewritePass, Rule, RuleSet

from .channels import const_array, copy_attrs

MS = "com.microsoft"


def _ln(op, y, gamma):
    return op.LayerNormalization(y, gamma, op.opt(op.const("beta")), _name="ln")


def _block(op, x, inner):
    """``x`` plus the biased output projection of ``inner``: the root, and ``x`` exposed to its Shape readers."""
    projected = op.Add(op.MatMul(inner, op.const("wo"), _name="out"), op.const("b"), _commute=True, _name="add")
    return op.Any(x, projected, _ops={"Sum", "Add"}, _commute=True, _name="res"), x


def _attention(op, y, gamma, mask_index, past, attention_bias):
    x = _ln(op, y, gamma)
    return _block(op, x, op.Attention(x, op.const("w"), op.opt(op.const("c")), op.opt(mask_index), op.opt(past),
                                      op.opt(attention_bias), _domain=MS, _name="reader"))


def _ffn(op, y, gamma):
    x = _ln(op, y, gamma)
    hidden = op.MatMul(x, op.const("w"), _name="proj")
    return _block(op, x, op.Any(hidden, op.opt(op.const("c")), _ops={"BiasGelu", "FastGelu"}, _domain=MS,
                                _name="reader"))


def _condition(ctx: MatchContext, ln: Node, w: Value, b: Value, beta: Value | None = None,
               c: Value | None = None) -> bool | str:
    x = ln.outputs[0]
    if x.is_graph_output():
        return f"the LayerNorm output {x.name!r} is a graph output: the shift would show"
    inside = {id(n) for n in ctx.match.nodes}
    for user in x.users():
        if id(user) not in inside and user.op_type != "Shape":
            return f"the LayerNorm output {x.name!r} is also read by {user.label()}, which would see the shift"
    rank = len(x.shape) if x.shape is not None else None
    axis = ln.attr("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"the LayerNorm normalizes from axis {axis} of a rank-{rank} input, not the last axis alone"
    bias, weight = const_array(b), const_array(w)
    if weight.ndim != 2 or bias.size != weight.shape[0] or bias.shape[-1:] != (bias.size,):
        return f"the bias has shape {list(bias.shape)}, not one value per hidden unit ({weight.shape[0]})"
    if bias.ndim > 1 and (rank is None or bias.ndim > rank):
        return f"the bias has shape {list(bias.shape)}, which may raise the rank of the sum"
    arrays = [a for a in (bias, weight, const_array(beta), const_array(c)) if a is not None]
    if any(not np.issubdtype(a.dtype, np.floating) for a in arrays):
        return "only float weights and biases"
    return True


def _replacement(op, ctx: MatchContext, y: Value, gamma: Value, w: Value, b: Value, ln: Node, reader: Node,
                 add: Node, res: Node, beta: Value | None = None, c: Value | None = None):
    dtype = const_array(b).dtype  # the activations' type, which beta and c share
    shift = const_array(b).astype(np.float64).reshape(-1)
    weight = const_array(w).astype(np.float64)
    old_beta = 0.0 if beta is None else const_array(beta).astype(np.float64)
    old_c = 0.0 if c is None else const_array(c).astype(np.float64)
    new_beta = op.const((old_beta + shift).astype(dtype), name=f"{ln.name}/beta_shifted")
    new_c = op.const((old_c - shift @ weight).astype(dtype), name=f"{reader.name}/bias_shifted")
    x = op.LayerNormalization(y, gamma, new_beta, _name=ln.name, _type=ln.outputs[0], **copy_attrs(ln))
    bias_index = 2 if reader.op_type == "Attention" else 1
    # rebuild the block between the LayerNorm and the root on x', the reader with its new bias, without the Add
    values = {id(ln.outputs[0]): x}
    for node in _producers_first(res, ctx.match.nodes):
        if node is add:
            values[id(add.outputs[0])] = values[id(next(v for v in add.inputs if v is not b))]
        if node is ln or node is add:
            continue
        inputs = [values.get(id(v), v) if v is not None else None for v in node.inputs]
        if node is reader:
            inputs += [None] * (bias_index + 1 - len(inputs))
            inputs[bias_index] = new_c
        values[id(node.outputs[0])] = getattr(op, node.op_type)(*inputs, _domain=node.domain, _name=node.name,
                                                                _type=node.outputs[0], **copy_attrs(node))
    return values[id(res.outputs[0])], x


def _producers_first(root: Node, nodes: list[Node]) -> list[Node]:
    """The matched ``nodes`` in an order where each comes after the matched nodes it reads."""
    inside, order, seen = {id(n) for n in nodes}, [], set()

    def visit(node: Node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for value in node.inputs:
            if value is not None and value.producer is not None and id(value.producer) in inside:
                visit(value.producer)
        order.append(node)

    visit(root)
    return order


RESIDUAL_BIAS_RULES = RuleSet([
    Rule("residual-bias-attention", _attention, _replacement, _condition),
    Rule("residual-bias-ffn", _ffn, _replacement, _condition),
])


@register_pass
class FoldResidualBias(RewritePass):
    name = "fold-residual-bias"
    description = ("Post-LN blocks: the output projection's bias Add moves into the previous LayerNorm's beta and "
                   "the block's input bias (one pass over the activation less per block)")
    level = "fuse"
    lossless = True
    rules = RESIDUAL_BIAS_RULES
