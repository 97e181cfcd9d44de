"""What the attention fusion must prove about the Reshapes around multi-head attention.

Exporters split heads with ``Reshape(q, shape)`` where ``shape`` is a constant (``[0, 0, 12, 64]``,
``[-1, 17, 2, 32]``) or computed from the runtime shape (``Concat(Shape(x)[0], Shape(x)[1], -1, 64)``).
Replacing ``Reshape -> Transpose -> ... -> Transpose`` by one op that takes ``[B, S, D]`` is right
only if the Reshape keeps dims 0 and 1 of its input and splits the last one into ``(heads,
head_size)``. This module reads a shape tensor as a list of pieces (a number, or "dim i of value t")
and proves that from constants, ``Reshape``'s copy-dim ``0``, equal value shapes (numbers or symbolic
names, never the ``unk__`` names onnx invents for unknown dims), or a common origin of the two dims
(:func:`dim_origin`: through ``MatMul`` by a constant matrix, bias ``Add``, shape-preserving ops, a
``Split`` along the last axis, the fused attention ops, residual ``Add``/``Sum`` of two tensors with that
dim in common, and Reshapes whose target reads the dim from ``Shape``).
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir import Node, Value

Piece = int | tuple[Value, int]  # a number, or dim i of a value
MAX_DEPTH = 12
MAX_NESTING = 64  # residual Adds nest one search per layer (memoized, so linear in the layers)
# Ops whose output has the shape of input 0.
_UNARY = frozenset({"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Cast", "Identity", "Neg", "Sqrt", "Exp",
                    "FastGelu", "BiasGelu", "QuickGelu", "LayerNormalization", "SimplifiedLayerNormalization",
                    "RMSNormalization", "Softmax", "Dropout"})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def elements(value: Value | None, depth: int = 0) -> list[Piece] | None:
    """The entries of a small 1-D (or scalar) int tensor as pieces, or None if not traceable."""
    if value is None or depth > MAX_DEPTH:
        return None
    if value.const is not None:
        if value.const.size > 16:
            return None
        return [int(v) for v in value.const.numpy().reshape(-1)]
    node = value.producer
    if node is None:
        return None
    op, ins = node.op_type, node.inputs
    if op == "Shape":
        rank = len(ins[0].shape) if ins[0].shape is not None else None
        if rank is None:
            return None
        start, end = node.attr("start", 0), node.attr("end", rank)
        return [(ins[0], i) for i in range(rank)[slice(start, end)]]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity") or (op == "Reshape" and _flat(ins[1])):
        return elements(ins[0], depth + 1)
    if op == "Concat" and node.attr("axis", 0) in (0, -1):
        parts = [elements(v, depth + 1) for v in ins]
        return None if any(p is None for p in parts) else [piece for part in parts for piece in part]
    if op == "Gather" and node.attr("axis", 0) == 0 and ins[1] is not None and ins[1].const is not None:
        data = elements(ins[0], depth + 1)
        index = [int(i) for i in ins[1].const.numpy().reshape(-1)]
        if data is None or any(not -len(data) <= i < len(data) for i in index):
            return None
        return [data[i] for i in index]
    if op == "Slice":
        return _slice(node, depth)
    return None


def _flat(shape: Value | None) -> bool:
    return shape is not None and shape.const is not None and shape.const.numpy().reshape(-1).tolist() in ([-1], [1])


def _slice(node: Node, depth: int) -> list[Piece] | None:
    data = elements(node.inputs[0], depth + 1)
    args = [elements(v, depth + 1) if v is not None else None for v in node.inputs[1:5]]
    if data is None or any(a is not None and not all(isinstance(x, int) for x in a) for a in args):
        return None
    starts, ends = args[0], args[1]
    axes, steps = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None)
    if not starts or not ends or len(starts) != 1 or (axes not in (None, [0], [-1])) or steps not in (None, [1]):
        return None
    return data[slice(max(starts[0], -len(data) - 1), min(ends[0], len(data)))]


def same_dim(a: Value, i: int, b: Value, j: int) -> bool:
    """Whether dim i of ``a`` provably equals dim j of ``b`` at run time."""
    if a is b and i == j:
        return True
    da, db = _dim(a, i), _dim(b, j)
    if da is not None and da == db and not (isinstance(da, str) and da.startswith("unk__")):
        return True
    if i < 0 or j < 0:
        return False
    memo: dict = {}
    (oa, ia), (ob, ib) = dim_origin(a, i, memo=memo), dim_origin(b, j, memo=memo)
    return oa is ob and ia == ib


def _dim(value: Value, i: int):
    shape = value.shape
    if shape is None or not -len(shape) <= i < len(shape):
        return None
    return shape[i]


def dim_origin(value: Value, i: int, depth: int = 0, memo: dict | None = None) -> tuple[Value, int]:
    """Follow producers back while dim ``i`` of the output is provably dim ``i'`` of an input: ops that keep
    every dim but the last (elementwise, last-axis ops, ``x @ W``), the attention ops (dims 0 and 1 are
    the query's), Reshapes whose target entry is a dim of some value (``Shape(t)[j]``) or a copied (``0``)
    dim, and residual Adds whose two inputs get the dim from one origin (a nested search per input,
    ``depth`` deep, its answers kept in ``memo``). Returns where the dim comes from."""
    memo = {} if memo is None else memo
    key = (id(value), i)
    if key not in memo:
        memo[key] = _origin(value, i, depth, memo)
    return memo[key]


def _origin(value: Value, i: int, depth: int, memo: dict) -> tuple[Value, int]:
    for _ in range(MAX_DEPTH):
        node, shape = value.producer, value.shape
        if node is None or shape is None or not 0 <= i < len(shape):
            return value, i
        if node.op_type == "Reshape":
            pieces = elements(node.inputs[1])
            piece = pieces[i] if pieces is not None and i < len(pieces) else None
            if isinstance(piece, tuple):
                value, i = piece
                continue
            if piece == 0 and node.attr("allowzero", 0) == 0:
                value = node.inputs[0]
                continue
            return value, i
        source = _passthrough(node) if i < len(shape) - 1 else None
        if source is not None:
            if source.shape is None or len(source.shape) != len(shape):
                return value, i
            value = source
            continue
        origin = _common_origin(node, i, depth, memo) if depth < MAX_NESTING else None
        if origin is None or origin == (value, i):
            return value, i
        value, i = origin
    return value, i


def _common_origin(node: Node, i: int, depth: int, memo: dict) -> tuple[Value, int] | None:
    """For a residual ``Add``/``Sum`` of two computed tensors of the output's rank: the common origin of
    dim ``i`` of both inputs (equal dims broadcast to themselves), or None."""
    ins, out = node.inputs, node.outputs[0]
    if node.op_type not in ("Add", "Sum") or len(ins) != 2 or any(v is None or v.shape is None for v in ins):
        return None
    if out.shape is None or not len(ins[0].shape) == len(ins[1].shape) == len(out.shape):
        return None
    (oa, ia), (ob, ib) = (dim_origin(v, i, depth + 1, memo) for v in ins)
    return (oa, ia) if oa is ob and ia == ib else None


def _passthrough(node: Node) -> Value | None:
    ins = node.inputs
    if node.op_type in _UNARY:  # shape-preserving (whatever axis a Softmax or LayerNorm normalizes)
        return ins[0]
    if node.op_type in _BINARY and len(ins) == 2:
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):  # a constant that broadcasts along the last axis only
            if c is not None and c.const is not None and all(d == 1 for d in c.const.shape[:-1]):
                return x
    if node.op_type == "MatMul" and ins[1].const is not None and len(ins[1].const.shape) == 2:
        return ins[0]
    if node.domain == "com.microsoft" and node.op_type in ("Attention", "MultiHeadAttention"):
        return ins[0]  # output [B, S, D_v]: B and S are the query's (input 0, 3-D: checked by the caller)
    if node.op_type == "Split" and ins[0].shape is not None and node.attr("axis", 0) in (-1, len(ins[0].shape) - 1):
        return ins[0]
    return None


@dataclass
class Heads:
    num_heads: int
    head_size: int


def split_heads(reshape: Node, data: Value) -> Heads | str:
    """Prove ``reshape`` turns ``data`` [B, S, D] into [B, S, heads, head_size]; the split, or why not."""
    shape = data.shape
    if shape is None or len(shape) != 3:
        return f"{data.name!r} is not known to be 3-D (shape {shape})"
    hidden = shape[2]
    if not isinstance(hidden, int):
        return f"the last dim of {data.name!r} is not known (shape {shape})"
    pieces = elements(reshape.inputs[1])
    if pieces is None or len(pieces) != 4:
        return f"{reshape.label()}: cannot read its target shape as 4 entries"
    copy_zero = reshape.attr("allowzero", 0) == 0
    tail = pieces[2:]
    if not all(isinstance(p, int) and p > 0 or p == -1 for p in tail) or tail == [-1, -1]:
        return f"{reshape.label()}: heads and head size {tail} are not constants"
    n, h = tail
    n, h = (hidden // h, h) if n == -1 else (n, hidden // n if h == -1 else h)
    if n * h != hidden:
        return f"{reshape.label()}: {tail} does not split the hidden size {hidden}"
    lead_known = []
    for k in (0, 1):
        p = pieces[k]
        lead_known.append((p == 0 and copy_zero) or (isinstance(p, int) and p > 0 and shape[k] == p) or
                          (isinstance(p, tuple) and same_dim(p[0], p[1], data, k)))
    if not all(lead_known):
        minus = [pieces[k] == -1 for k in (0, 1)]
        if not (minus[0] and lead_known[1]) and not (minus[1] and lead_known[0]):
            return f"{reshape.label()}: cannot prove it keeps dims 0 and 1 of {data.name!r} ({pieces[:2]})"
    return Heads(n, h)
