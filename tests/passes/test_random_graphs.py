"""Differential tests on random graphs: graphopt's default pipeline vs onnxruntime on the original.

Hypothesis builds random valid ONNX graphs (opsets 17-21) from the ops simplification passes rewrite:
elementwise math with broadcasting between ranks, shape ops with constant operands (Reshape with 0 and
-1, Transpose, Squeeze/Unsqueeze, Flatten, Concat, Split, Slice, Expand, Tile), no-op forms of them
(inverse Transpose pairs, full Slices, Tile by 1s, single-input Concat), Shape-driven Expand/Reshape/
ConstantOfShape, Identity, Dropout, Cast round trips (exact and lossy), Where, MatMul with a constant
weight and bias, If with constant or computed conditions whose branches read outer values, constants
as initializers and as Constant nodes (duplicates, zeros and ones), repeated subexpressions, and
sometimes a symbolic batch dim. Each graph goes through
``optimize(load(proto))``; the IR must stay well formed and every output must match onnxruntime running
the original: exactly for integers and bools, within rtol 1e-5 (atol 1e-6) for floats, at the generated
batch size and, for dynamic graphs, at a second one. A failing case is shrunk by hypothesis and printed
as ONNX text (``onnx.printer``), ready to paste into a regression test.

The default test is derandomized (the same cases on every run, for CI); the slow one explores new cases.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.printer
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import verify as verify_ir
from graphopt.optimize import optimize

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
NP_TYPES = {FLOAT: np.float32, INT64: np.int64, BOOL: np.bool_}
BATCH = "B"  # the symbolic dim of dynamic graphs
Dim = int | str
Shape = tuple[Dim, ...]
MAX_RANK = 5
MAX_ELEMENTS = 2048  # at the largest batch size tried, so Tile/Expand chains stay cheap
MAX_BATCH = 4
INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------- shapes


def numel(shape: Shape, batch: int = MAX_BATCH) -> int:
    return math.prod(batch if d == BATCH else d for d in shape)


def concrete(shape: Shape, batch: int) -> tuple[int, ...]:
    return tuple(batch if d == BATCH else d for d in shape)


def broadcast(*shapes: Shape) -> Shape | None:
    """Numpy broadcasting where the symbolic batch dim only meets itself or 1 (anything else would break
    at some batch size); None when the shapes are incompatible."""
    out: list[Dim] = []
    for dims in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        rest = {d for d in dims if d != 1}
        if len(rest) > 1:
            return None
        out.append(rest.pop() if rest else 1)
    return tuple(reversed(out))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------- builder


@dataclass(frozen=True)
class Val:
    """A value the generator can use: name, element type, and shape (``"B"`` for the batch dim)."""

    name: str
    dtype: int
    shape: Shape


@dataclass
class Builder:
    """Accumulates a graph while hypothesis draws the choices; every value it adds is valid to use."""

    draw: Callable[[st.SearchStrategy[Any]], Any]
    opset: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[Val] = field(default_factory=list)
    pool: list[Val] = field(default_factory=list)
    made: list[np.ndarray] = field(default_factory=list)  # constant arrays made so far, for duplicates
    counter: int = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.fresh("v") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{op.lower()}_"), **attrs))
        return outs

    def add(self, name: str, dtype: int, shape: Shape) -> Val:
        val = Val(name, dtype, tuple(shape))
        self.pool.append(val)
        return val

    def const(self, array: np.ndarray) -> str:
        """An initializer or a Constant node holding ``array``."""
        name = self.fresh("c")
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if self.draw(st.booleans()):
            self.inits.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("constant_"), value=tensor))
        return name

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.draw(st.integers(0, 2**16)))

    def data(self, dtype: int, shape: tuple[int, ...], *, nonzero: bool = False) -> np.ndarray:
        """Constant data: random, zeros, ones, or a copy of an earlier constant of that shape and type."""
        np_type = NP_TYPES[dtype]
        same = [a for a in self.made if a.shape == shape and a.dtype == np_type and (not nonzero or a.all())]
        kinds = ["random", "random", "ones"] + ([] if nonzero else ["zeros"]) + (["duplicate"] if same else [])
        kind = self.draw(st.sampled_from(kinds))
        rng = self.rng()
        if kind == "duplicate":
            array = self.draw(st.sampled_from(same)).copy()
        elif kind == "zeros":
            array = np.zeros(shape, np_type)
        elif kind == "ones":
            array = np.ones(shape, np_type)
        elif dtype == BOOL:
            array = rng.random(shape) < 0.5
        elif dtype == INT64:
            array = rng.integers(-4, 5, shape).astype(np.int64)
            if nonzero:
                array[array == 0] = 1
        elif nonzero:  # safe denominators: |d| in [0.5, 2]
            array = (rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)
        else:
            array = rng.standard_normal(shape).astype(np.float32)
        self.made.append(array)
        return array

    def pick(self, accept: Callable[[Val], bool] = lambda v: True) -> Val | None:
        """A pool value ``accept`` likes, often one of the latest (deep chains rather than wide, dead graphs)."""
        candidates = [v for v in self.pool if accept(v)]
        if len(candidates) > 3 and self.draw(st.booleans()):
            candidates = candidates[-3:]
        return self.draw(st.sampled_from(candidates)) if candidates else None

    def partner_shape(self, shape: Shape) -> tuple[int, ...]:
        """A static shape that broadcasts against ``shape``: a suffix of it with some dims set to 1."""
        keep = self.draw(st.integers(0, len(shape)))
        tail = shape[len(shape) - keep:]
        return tuple(1 if d == BATCH or self.draw(st.booleans()) else d for d in tail) if keep else ()

    def operand(self, like: Val, *, nonzero: bool = False) -> Val:
        """A second operand for ``like``: a broadcast-compatible pool value or a new constant."""
        if not nonzero and self.draw(st.booleans()):
            other = self.pick(lambda v: v.dtype == like.dtype and broadcast(v.shape, like.shape) is not None)
            if other is not None:
                return other
        shape = self.partner_shape(like.shape)
        return Val(self.const(self.data(like.dtype, shape, nonzero=nonzero)), like.dtype, shape)

    def safe_denominator(self, like: Val) -> Val:
        """A nonzero divisor: a constant away from zero, or |v| + 1 for a pool value v."""
        if self.draw(st.booleans()):
            return self.operand(like, nonzero=True)
        v = self.pick(lambda v: v.dtype == like.dtype and broadcast(v.shape, like.shape) is not None)
        if v is None:
            return self.operand(like, nonzero=True)
        (absolute,) = self.node("Abs", [v.name])
        one = self.const(np.ones((), NP_TYPES[like.dtype]))
        (den,) = self.node("Add", [absolute, one])
        return Val(den, like.dtype, v.shape)


# ------------------------------------------------------------------------------------------- ops


def op_binary(b: Builder) -> None:
    a = b.pick(lambda v: v.dtype in (FLOAT, INT64))
    if a is None:
        return
    op = b.draw(st.sampled_from(["Add", "Sub", "Mul", "Div", "Max", "Min"]))
    other = b.safe_denominator(a) if op == "Div" else b.operand(a)
    lhs, rhs = (a, other) if op == "Div" or b.draw(st.booleans()) else (other, a)
    (out,) = b.node(op, [lhs.name, rhs.name])
    b.add(out, a.dtype, broadcast(lhs.shape, rhs.shape))


UNARY = {FLOAT: ["Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity"], INT64: ["Neg", "Abs", "Identity"],
         BOOL: ["Identity", "Not"]}


def op_unary(b: Builder) -> None:
    a = b.pick()
    (out,) = b.node(b.draw(st.sampled_from(UNARY[a.dtype])), [a.name])
    b.add(out, a.dtype, a.shape)


def op_dropout(b: Builder) -> None:
    a = b.pick(lambda v: v.dtype == FLOAT)
    if a is None:
        return
    form = b.draw(st.sampled_from(["plain", "ratio", "training_false", "mask"]))
    inputs = [a.name]
    if form in ("ratio", "training_false"):
        inputs.append(b.const(np.array(0.3, np.float32)))
    if form == "training_false":
        inputs.append(b.const(np.array(False)))
    outs = b.node("Dropout", inputs, n_out=2 if form == "mask" else 1)
    b.add(outs[0], FLOAT, a.shape)
    if form == "mask":
        b.add(outs[1], BOOL, a.shape)


CASTS = {
    FLOAT: [[FLOAT], [TensorProto.DOUBLE, FLOAT], [TensorProto.FLOAT16, FLOAT], [TensorProto.INT32, FLOAT],
            [INT64, FLOAT], [BOOL, FLOAT], [INT64]],
    INT64: [[INT64], [FLOAT, INT64], [TensorProto.INT32, INT64], [TensorProto.DOUBLE, INT64], [FLOAT]],
    BOOL: [[FLOAT], [INT64], [INT64, BOOL]],
}


def op_cast(b: Builder) -> None:
    a = b.pick()
    name = a.name
    chain = b.draw(st.sampled_from(CASTS[a.dtype]))
    for to in chain:
        (name,) = b.node("Cast", [name], to=to)
    b.add(name, chain[-1], a.shape)


def op_where(b: Builder) -> None:
    x = b.pick(lambda v: v.dtype != BOOL)
    if x is None:
        return
    y = b.operand(x)
    choice = b.draw(st.sampled_from(["compare", "pool", "constant"]))
    cond = b.pick(lambda v: v.dtype == BOOL and broadcast(v.shape, x.shape, y.shape) is not None)
    if choice == "compare" or (choice == "pool" and cond is None):
        other = b.operand(x)
        (name,) = b.node(b.draw(st.sampled_from(["Greater", "Less", "Equal"])), [x.name, other.name])
        cond = Val(name, BOOL, broadcast(x.shape, other.shape))
    elif choice == "constant":
        shape = b.partner_shape(x.shape)
        cond = Val(b.const(b.data(BOOL, shape)), BOOL, shape)
    shape = broadcast(cond.shape, x.shape, y.shape)
    if shape is None:
        return
    (out,) = b.node("Where", [cond.name, x.name, y.name])
    b.add(out, x.dtype, shape)


def op_reshape(b: Builder) -> None:
    a = b.pick(lambda v: v.shape.count(BATCH) <= 1)
    if a is None:
        return
    static = numel(tuple(d for d in a.shape if d != BATCH))
    rank = b.draw(st.integers(1 if BATCH in a.shape else 0, 4))
    dims: list[int] = []
    rest = static
    for _ in range(rank - (1 if BATCH in a.shape else 0) - 1):
        d = b.draw(st.sampled_from(divisors(rest)))
        dims.append(d)
        rest //= d
    if rank - (1 if BATCH in a.shape else 0) > 0:
        dims.append(rest)
    elif rest != 1:
        return
    out_shape: list[Dim] = list(dims)
    target: list[int] = list(dims)
    if BATCH in a.shape:  # the batch goes where the -1 is
        at = b.draw(st.integers(0, len(dims)))
        out_shape.insert(at, BATCH)
        target.insert(at, -1)
    elif target and b.draw(st.booleans()):
        target[b.draw(st.integers(0, len(target) - 1))] = -1
    for i, d in enumerate(out_shape):  # 0 copies the input's dim at the same index
        if i < len(a.shape) and a.shape[i] == d and b.draw(st.booleans()):
            target[i] = 0
    (out,) = b.node("Reshape", [a.name, b.const(np.array(target, np.int64))])
    b.add(out, a.dtype, tuple(out_shape))


def op_transpose(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) >= 1)
    if a is None:
        return
    form = b.draw(st.sampled_from(["random", "identity", "default", "inverse_pair"]))
    rank = len(a.shape)
    if form == "default":  # no perm: reverse the axes
        (out,) = b.node("Transpose", [a.name])
        b.add(out, a.dtype, a.shape[::-1])
        return
    perm = list(range(rank)) if form == "identity" else list(b.draw(st.permutations(range(rank))))
    (out,) = b.node("Transpose", [a.name], perm=perm)
    shape = tuple(a.shape[p] for p in perm)
    if form == "inverse_pair":  # a transpose undone (a no-op pair for simplifiers to cancel)
        (out,) = b.node("Transpose", [out], perm=[perm.index(i) for i in range(rank)])
        shape = a.shape
    b.add(out, a.dtype, shape)


def op_unsqueeze(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) < MAX_RANK)
    if a is None:
        return
    new_rank = b.draw(st.integers(len(a.shape) + 1, min(MAX_RANK, len(a.shape) + 2)))
    axes = b.draw(st.lists(st.integers(0, new_rank - 1), min_size=new_rank - len(a.shape),
                           max_size=new_rank - len(a.shape), unique=True))
    shape = iter(a.shape)
    out_shape = tuple(1 if i in axes else next(shape) for i in range(new_rank))
    written = [ax - new_rank if b.draw(st.booleans()) else ax for ax in axes]
    (out,) = b.node("Unsqueeze", [a.name, b.const(np.array(written, np.int64))])
    b.add(out, a.dtype, out_shape)


def op_squeeze(b: Builder) -> None:
    a = b.pick(lambda v: 1 in v.shape)
    if a is None:
        return
    ones = [i for i, d in enumerate(a.shape) if d == 1]
    if BATCH not in a.shape and b.draw(st.booleans()):  # no axes: every 1 goes (never with a batch dim)
        (out,) = b.node("Squeeze", [a.name])
        b.add(out, a.dtype, tuple(d for d in a.shape if d != 1))
        return
    axes = b.draw(st.lists(st.sampled_from(ones), min_size=1, max_size=len(ones), unique=True))
    written = [ax - len(a.shape) if b.draw(st.booleans()) else ax for ax in axes]
    (out,) = b.node("Squeeze", [a.name, b.const(np.array(written, np.int64))])
    b.add(out, a.dtype, tuple(d for i, d in enumerate(a.shape) if i not in axes))


def _product(dims: Shape) -> Dim | None:
    """The product of dims as a dim: the batch symbol times static 1s stays the batch symbol."""
    if BATCH not in dims:
        return math.prod(dims)  # type: ignore[arg-type]
    return BATCH if dims.count(BATCH) == 1 and numel(tuple(d for d in dims if d != BATCH)) == 1 else None


def op_flatten(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) >= 1)
    if a is None:
        return
    rank = len(a.shape)
    axis = b.draw(st.integers(0, rank))
    outer, inner = _product(a.shape[:axis]), _product(a.shape[axis:])
    if outer is None or inner is None:
        return
    written = axis - rank if axis < rank and b.draw(st.booleans()) else axis
    (out,) = b.node("Flatten", [a.name], axis=written)
    b.add(out, a.dtype, (outer, inner))


def op_concat(b: Builder) -> None:
    a = b.pick(lambda v: any(d != BATCH for d in v.shape))
    if a is None:
        return
    axis = b.draw(st.sampled_from([i for i, d in enumerate(a.shape) if d != BATCH]))

    def fits(v: Val) -> bool:
        return v.dtype == a.dtype and len(v.shape) == len(a.shape) and v.shape[axis] != BATCH and all(
            i == axis or d == e for i, (d, e) in enumerate(zip(v.shape, a.shape, strict=True)))

    parts = [a]
    for _ in range(b.draw(st.integers(0, 2))):
        other = b.pick(fits) if b.draw(st.booleans()) else None
        if other is None:
            if BATCH in a.shape:
                continue
            shape = tuple(b.draw(st.integers(1, 3)) if i == axis else d for i, d in enumerate(a.shape))
            other = Val(b.const(b.data(a.dtype, shape)), a.dtype, shape)
        parts.insert(b.draw(st.integers(0, len(parts))), other)
    written = axis - len(a.shape) if b.draw(st.booleans()) else axis
    (out,) = b.node("Concat", [p.name for p in parts], axis=written)
    b.add(out, a.dtype, tuple(sum(p.shape[axis] for p in parts) if i == axis else d for i, d in enumerate(a.shape)))


def op_split(b: Builder) -> None:
    a = b.pick(lambda v: any(d != BATCH and d >= 2 for d in v.shape))
    if a is None:
        return
    axis = b.draw(st.sampled_from([i for i, d in enumerate(a.shape) if d != BATCH and d >= 2]))
    size = a.shape[axis]
    parts = b.draw(st.integers(1, min(3, size)))
    if b.opset >= 18 and parts > 1 and b.draw(st.booleans()):  # num_outputs: ceil(size / parts), the last smaller
        chunk = -(-size // parts)
        sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
        if sizes[-1] <= 0:
            return
        outs = b.node("Split", [a.name], n_out=parts, axis=axis, num_outputs=parts)
    else:
        cuts = sorted(b.draw(st.lists(st.integers(1, size - 1), min_size=parts - 1, max_size=parts - 1,
                                      unique=True)))
        sizes = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, size], strict=True)]
        outs = b.node("Split", [a.name, b.const(np.array(sizes, np.int64))], n_out=parts, axis=axis)
    for out, n in zip(outs, sizes, strict=True):
        b.add(out, a.dtype, tuple(n if i == axis else d for i, d in enumerate(a.shape)))


def op_slice(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) >= 1)
    if a is None:
        return
    rank = len(a.shape)
    axes = b.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    starts, ends, steps, out_shape = [], [], [], list(a.shape)
    full = b.draw(st.integers(0, 3)) == 0  # a no-op slice
    for ax in axes:
        d = a.shape[ax]
        if d == BATCH or full:  # only the full range keeps the batch symbolic
            starts.append(0)
            ends.append(INT64_MAX)
            steps.append(1)
            continue
        step = b.draw(st.sampled_from([1, 1, 2, -1]))
        start = b.draw(st.integers(-d - 1, d + 1))
        end = b.draw(st.sampled_from([INT64_MAX, -INT64_MAX - 1, *range(-d - 1, d + 2)]))
        length = len(range(d)[slice(start, end, step)])
        if length == 0:  # keep tensors non-empty
            start, end, step, length = 0, d, 1, d
        starts.append(start)
        ends.append(end)
        steps.append(step)
        out_shape[ax] = length
    inputs = [a.name, b.const(np.array(starts, np.int64)), b.const(np.array(ends, np.int64))]
    with_axes = axes != list(range(len(axes))) or b.draw(st.booleans())
    if with_axes or any(s != 1 for s in steps):
        written = [ax - rank if b.draw(st.booleans()) else ax for ax in axes]
        inputs.append(b.const(np.array(written, np.int64)))
    if any(s != 1 for s in steps) or (len(inputs) == 4 and b.draw(st.booleans())):
        inputs.append(b.const(np.array(steps, np.int64)))
    (out,) = b.node("Slice", inputs)
    b.add(out, a.dtype, tuple(out_shape))


def op_expand(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) < MAX_RANK)
    if a is None:
        return
    noop = b.draw(st.integers(0, 2)) == 0  # a target of 1s or of the same dims changes nothing
    extra = 0 if noop else b.draw(st.integers(0, min(2, MAX_RANK - len(a.shape))))
    target = [b.draw(st.integers(1, 3)) for _ in range(extra)]
    for d in a.shape:  # 1 keeps a dim (the batch too); a 1 may grow
        grow = not noop and d == 1
        target.append(b.draw(st.integers(1, 3)) if grow else (d if d != BATCH and b.draw(st.booleans()) else 1))
    shape = broadcast(a.shape, tuple(target))
    if shape is None or numel(shape) > MAX_ELEMENTS:
        return
    (out,) = b.node("Expand", [a.name, b.const(np.array(target, np.int64))])
    b.add(out, a.dtype, shape)


def op_tile(b: Builder) -> None:
    a = b.pick(lambda v: len(v.shape) >= 1)
    if a is None:
        return
    noop = b.draw(st.integers(0, 2)) == 0
    repeats = [1 if d == BATCH or noop else b.draw(st.integers(1, 3)) for d in a.shape]
    shape = tuple(BATCH if d == BATCH else d * r for d, r in zip(a.shape, repeats, strict=True))
    if numel(shape) > MAX_ELEMENTS:
        return
    (out,) = b.node("Tile", [a.name, b.const(np.array(repeats, np.int64))])
    b.add(out, a.dtype, shape)


def op_matmul(b: Builder) -> None:
    """x @ W with a constant weight, often plus a bias (the pattern MatMul+Add->Gemm fusion looks for)."""
    a = b.pick(lambda v: v.dtype == FLOAT and len(v.shape) >= 1 and v.shape[-1] != BATCH)
    if a is None:
        return
    outer = _product(a.shape[:-1])
    if len(a.shape) != 2 and outer is not None and b.draw(st.booleans()):  # 2-D, as Gemm wants
        (flat,) = b.node("Flatten", [a.name], axis=len(a.shape) - 1)
        a = Val(flat, FLOAT, (outer, a.shape[-1]))
    n = b.draw(st.integers(1, 4))
    weight = b.const(b.data(FLOAT, (a.shape[-1], n)))
    (out,) = b.node("MatMul", [a.name, weight])
    shape = (*a.shape[:-1], n)
    if b.draw(st.booleans()):  # a constant scale (linear scale folding)
        (out,) = b.node("Mul", [out, b.const(b.data(FLOAT, b.draw(st.sampled_from([(n,), ()]))))])
    if b.draw(st.booleans()):
        bias_shape = b.draw(st.sampled_from([(n,), (1, n), ()]))
        (out,) = b.node("Add", [out, b.const(b.data(FLOAT, bias_shape))])
        shape = broadcast(shape, bias_shape)
    b.add(out, FLOAT, shape)


def op_shape(b: Builder) -> None:
    """Shape of a value (sometimes a range of it): int64 data that is constant unless it holds the batch."""
    a = b.pick(lambda v: len(v.shape) >= 1)
    if a is None:
        return
    rank = len(a.shape)
    attrs = {}
    start, end = 0, rank
    if b.opset >= 15 and b.draw(st.booleans()):
        start = b.draw(st.integers(-rank, rank - 1))
        end = b.draw(st.integers(-rank, rank))
        attrs = {"start": start, "end": end}
    length = len(range(rank)[slice(start, end)])
    if length == 0:
        return
    (out,) = b.node("Shape", [a.name], **attrs)
    b.add(out, INT64, (length,))


def op_like(b: Builder) -> None:
    """Expand, Reshape or ConstantOfShape to the runtime shape of another value (shape folding's work)."""
    x = b.pick(lambda v: len(v.shape) >= 1)
    if x is None:
        return
    (shape,) = b.node("Shape", [x.name])
    form = b.draw(st.sampled_from(["expand", "reshape", "constant_of_shape"]))
    if form == "constant_of_shape":
        value = b.draw(st.sampled_from([np.array([0.0], np.float32), np.array([1.5], np.float32),
                                        np.array([3], np.int64)]))
        (out,) = b.node("ConstantOfShape", [shape], value=numpy_helper.from_array(value))
        b.add(out, FLOAT if value.dtype == np.float32 else INT64, x.shape)
        return
    if form == "expand":
        y = b.pick(lambda v: len(v.shape) <= len(x.shape) and broadcast(v.shape, x.shape) == x.shape)
    else:
        y = b.pick(lambda v: v.shape.count(BATCH) == x.shape.count(BATCH) and numel(v.shape, 1) == numel(x.shape, 1))
    if y is None:
        return
    (out,) = b.node("Expand" if form == "expand" else "Reshape", [y.name, shape])
    b.add(out, y.dtype, x.shape)


def _branch(b: Builder, x: Val, out_name: str) -> onnx.GraphProto:
    """A one- or two-node If branch computing from ``x``, a value of the enclosing graph."""
    nodes = []
    name = x.name
    for _ in range(b.draw(st.integers(1, 2))):
        op = b.draw(st.sampled_from(UNARY[x.dtype]))
        nxt = b.fresh("s")
        nodes.append(helper.make_node(op, [name], [nxt], name=b.fresh(f"{op.lower()}_")))
        name = nxt
    nodes.append(helper.make_node("Identity", [name], [out_name], name=b.fresh("identity_")))
    return helper.make_graph(nodes, b.fresh("branch"), [], [_value_info(Val(out_name, x.dtype, x.shape))])


def op_if(b: Builder) -> None:
    """If with a constant or computed condition; the branches read the outer graph (captured values).

    The branches capture ``Abs(x)``, never ``x`` itself: onnxruntime 1.32 (even with ORT_DISABLE_ALL)
    removes lossless Cast chains (float->double->float, or two same-type Casts) and then fails with
    "Missing Input" when the chain's result is read inside an If branch. An Abs output cannot become a
    Cast output under any rewrite, so neither the original nor graphopt's output trips on it.
    """
    x = b.pick(lambda v: v.dtype != BOOL)
    if x is None:
        return
    (captured,) = b.node("Abs", [x.name])
    x = Val(captured, x.dtype, x.shape)
    scalar = b.pick(lambda v: v.dtype == FLOAT and numel(v.shape) == 1 and BATCH not in v.shape)
    if scalar is not None and b.draw(st.booleans()):
        (cond,) = b.node("Greater", [scalar.name, b.const(np.zeros((), np.float32))])
    else:
        cond = b.const(np.array(b.draw(st.booleans())).reshape(b.draw(st.sampled_from([(), (1,)]))))
    out = b.fresh("v")
    b.nodes.append(helper.make_node("If", [cond], [out], name=b.fresh("if_"),
                                    then_branch=_branch(b, x, b.fresh("t")), else_branch=_branch(b, x, b.fresh("e"))))
    b.add(out, x.dtype, x.shape)


def op_constant(b: Builder) -> None:
    """A free-standing constant, so that ops between constants (folding) happen too."""
    dtype = b.draw(st.sampled_from([FLOAT, FLOAT, INT64]))
    shape = tuple(b.draw(st.lists(st.integers(1, 4), max_size=3)))
    b.add(b.const(b.data(dtype, shape)), dtype, shape)


def op_repeat(b: Builder) -> None:
    """Emit an earlier node again on the same inputs: a common subexpression."""
    candidates = [n for n in b.nodes if n.op_type not in ("Constant", "If")]  # If: subgraph names are unique
    if not candidates:
        return
    old = b.draw(st.sampled_from(candidates))
    vals = {v.name: v for v in b.pool}
    if not all(o in vals for o in old.output):
        return
    new = b.node(old.op_type, list(old.input), n_out=len(old.output))
    b.nodes[-1].attribute.extend(old.attribute)
    for o, n in zip(old.output, new, strict=True):
        b.add(n, vals[o].dtype, vals[o].shape)


OPS: dict[str, Callable[[Builder], None]] = {
    "binary": op_binary, "binary2": op_binary, "unary": op_unary, "dropout": op_dropout, "cast": op_cast,
    "where": op_where, "reshape": op_reshape, "transpose": op_transpose, "unsqueeze": op_unsqueeze,
    "squeeze": op_squeeze, "flatten": op_flatten, "concat": op_concat, "split": op_split, "slice": op_slice,
    "expand": op_expand, "tile": op_tile, "constant": op_constant, "repeat": op_repeat, "shape": op_shape,
    "like": op_like, "matmul": op_matmul, "if": op_if,
}


# ------------------------------------------------------------------------------------------ graphs


@dataclass
class RandomGraph:
    """A generated model with its inputs; its repr is the ONNX text, which is what hypothesis prints."""

    proto: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    second_feeds: dict[str, np.ndarray] | None
    shapes: dict[str, Shape]
    batch: int

    def __repr__(self) -> str:
        second = "" if self.second_feeds is None else f"; second inputs {_batch(self.second_feeds)}"
        return f"RandomGraph(inputs {_batch(self.feeds)}{second}):\n{onnx.printer.to_text(self.proto)}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What hypothesis prints for a falsifying example (it would otherwise list the dataclass fields)."""
        printer.text(repr(self))


def _batch(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())


def _value_info(val: Val) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(val.name, val.dtype, list(val.shape))


def _feeds(inputs: list[Val], batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for val in inputs:
        shape = concrete(val.shape, batch)
        if val.dtype == INT64:
            feeds[val.name] = rng.integers(-4, 5, shape).astype(np.int64)
        else:
            feeds[val.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _outputs(b: Builder) -> list[Val]:
    """Every computed value nothing reads (so little of the graph is dead), the latest one, and sometimes
    an input, a constant or an intermediate value as well."""
    used = {name for node in b.nodes for name in node.input}
    computed = {out for node in b.nodes if node.op_type != "Constant" for out in node.output}
    sinks = [v for v in b.pool if v.name in computed and v.name not in used][-6:]
    extra = b.draw(st.lists(st.sampled_from(b.pool), max_size=2))
    chosen: dict[str, Val] = {}
    for val in [*sinks, b.pool[-1], *extra]:
        chosen.setdefault(val.name, val)
    return list(chosen.values())


@st.composite
def random_graphs(draw: Callable[[st.SearchStrategy[Any]], Any], max_ops: int = 12) -> RandomGraph:
    opset = draw(st.integers(17, 21))
    dynamic = draw(st.booleans())
    b = Builder(draw, opset)
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from([FLOAT, FLOAT, FLOAT, INT64]))
        dims: list[Dim] = draw(st.lists(st.integers(1, 4), min_size=0 if i else 1, max_size=4))
        if dynamic and dims and (i == 0 or draw(st.booleans())):
            dims[0] = BATCH
        b.inputs.append(b.add(f"in{i}", dtype, tuple(dims)))
    for _ in range(draw(st.integers(0, 2))):
        op_constant(b)
    for _ in range(draw(st.integers(1, max_ops))):
        OPS[draw(st.sampled_from(sorted(OPS)))](b)
    outputs = _outputs(b)
    graph = helper.make_graph(b.nodes, "random", [_value_info(v) for v in b.inputs],
                              [_value_info(v) for v in outputs], b.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    batch = draw(st.integers(1, 3)) if dynamic else 1
    second = draw(st.sampled_from([n for n in range(1, MAX_BATCH + 1) if n != batch])) if dynamic else None
    seed = draw(st.integers(0, 2**16))
    return RandomGraph(proto, _feeds(b.inputs, batch, seed),
                       None if second is None else _feeds(b.inputs, second, seed + 1),
                       {v.name: v.shape for v in outputs}, batch)


# ------------------------------------------------------------------------------------------- check


def run_ort(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))


def assert_same(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(got) == list(ref), f"outputs {list(got)}, expected {list(ref)}"
    for name, want in ref.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, (
            f"{name}: {have.dtype}{list(have.shape)}, expected {want.dtype}{list(want.shape)}")
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(have, want, err_msg=name)


def check_graph(case: RandomGraph) -> None:
    """The generated model is valid, and graphopt's default pipeline keeps its outputs."""
    onnx.checker.check_model(case.proto, full_check=True)  # a generator bug, not a graphopt bug
    feed_sets = [case.feeds] + ([case.second_feeds] if case.second_feeds is not None else [])
    refs = [run_ort(case.proto, feeds) for feeds in feed_sets]
    for name, value in refs[0].items():
        assert value.shape == concrete(case.shapes[name], case.batch), f"generator: wrong shape for {name}"
    try:
        model = graphopt.load(case.proto)
        optimize(model)
        verify_ir(model)
        optimized = graphopt.to_bytes(model)
        for feeds, ref in zip(feed_sets, refs, strict=True):
            assert_same(ref, run_ort(optimized, feeds))
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}\n\noriginal model:\n{onnx.printer.to_text(case.proto)}"
                             f"\n\nfeeds: {_batch(case.feeds)}") from exc


FAST = settings(max_examples=300, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=3000, derandomize=False)


@FAST
@given(random_graphs())
def test_default_pipeline_on_random_graphs(case: RandomGraph) -> None:
    check_graph(case)


@pytest.mark.slow
@SLOW
@given(random_graphs(max_ops=24))
def test_default_pipeline_on_many_random_graphs(case: RandomGraph) -> None:
    check_graph(case)
