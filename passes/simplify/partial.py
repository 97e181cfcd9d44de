"""Partial values of small integer tensors: each element a number, a symbolic dim, or unknown.

Shape computations (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``)
are small int64 tensors where some elements are static and others are a
dynamic dim (batch, sequence). Tracking them element by element lets shape
folding turn the static parts into constants and recognise "this element is
dim i of x" without fixing the dynamic dims to numbers.

An element is an ``int``, a :class:`Sym`, or ``None`` (unknown). A symbol is
named by the dim's name (``"batch"``: equal names are equal sizes, as ONNX
declares) or by a :class:`DimOf` for an unnamed dim of a particular value. Symbols are sizes,
so never negative, which decides comparisons such as ``Equal(dim, -1)`` that
torchscript exports use. Data-movement ops (Gather, Slice, Concat, ...) run
on numpy object arrays of elements, so their semantics are numpy's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt.ir import Node, TensorType, Value

MAX_ELEMENTS = 256
INT_TYPES = frozenset({
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
})
_INT64 = onnx.TensorProto.INT64
_BOOL = onnx.TensorProto.BOOL


@dataclass(frozen=True, slots=True)
class DimOf:
    """Dim ``axis`` of the value with id ``value_id`` (a dim without a name)."""

    value_id: int
    axis: int


class Sym:
    """A dynamic dim: compared by ``name`` (a dim_param or a :class:`DimOf`), and remembering one
    ``(value, axis)`` it was read from, so a run of dims can be re-read with one ``Shape(value, start, end)``."""

    __slots__ = ("name", "value", "axis")

    def __init__(self, name: str | DimOf, value: Value, axis: int) -> None:
        self.name, self.value, self.axis = name, value, axis

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sym) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Sym({self.name!r})"


def is_symbol(e: Any) -> bool:
    return isinstance(e, Sym)


class Partial:
    """An integer tensor's partial value: ONNX element type and an object array of elements."""

    __slots__ = ("elem_type", "array", "known")

    def __init__(self, elem_type: int, array: np.ndarray) -> None:
        self.elem_type = elem_type
        self.array = array
        self.known = set(map(type, array.ravel().tolist())) <= {int}

    def numpy(self) -> np.ndarray:
        from graphopt.ir.tensor import numpy_dtype

        return np.array([int(e) for e in self.array.flat], dtype=numpy_dtype(self.elem_type)).reshape(
            self.array.shape)

    def ints(self) -> list[int] | None:
        return [int(e) for e in self.array.flat] if self.known else None


def objects(items: Sequence[Any], shape: tuple[int, ...]) -> np.ndarray:
    """An object array holding ``items`` as they are (numpy would unpack tuples and strings)."""
    array = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        array[i] = item
    return array.reshape(shape)


def dim_symbol(value: Value, axis: int) -> int | Sym | None:
    """What is known about dim ``axis`` of ``value``: its size, or a symbol (its name, else DimOf)."""
    shape = value.shape
    if shape is None or axis >= len(shape):
        return None
    dim = shape[axis]
    if isinstance(dim, int):
        return dim
    return Sym(dim if isinstance(dim, str) else DimOf(id(value), axis), value, axis)


def from_array(array: np.ndarray, elem_type: int) -> Partial | None:
    if array.size > MAX_ELEMENTS or elem_type not in INT_TYPES:
        return None
    return Partial(elem_type, objects([int(x) for x in array.reshape(-1)], array.shape))


def unknown(value: Value) -> Partial | None:
    """All elements unknown, when at least the value's static small integer shape is known."""
    t = value.type
    if not isinstance(t, TensorType) or not t.is_static() or t.elem_type not in INT_TYPES:
        return None
    if math.prod(t.shape) > MAX_ELEMENTS:
        return None
    return Partial(t.elem_type, objects([None] * math.prod(t.shape), tuple(t.shape)))


# -- per-op rules ------------------------------------------------------------------------------
Rule = Callable[[Node, list[Partial | None], int], list[Partial | None]]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def propagate(node: Node, inputs: list[Partial | None], opset: int) -> list[Partial | None]:
    """Partial values of ``node``'s outputs (None where nothing is known)."""
    fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if fn is None:
        return [None] * len(node.outputs)
    try:
        out = fn(node, inputs, opset)
    except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError):
        return [None] * len(node.outputs)
    return [p if p is not None and p.array.size <= MAX_ELEMENTS else None for p in out]


def _ints(p: Partial | None) -> list[int] | None:
    return None if p is None else p.ints()


def _attr_or_input(node: Node, inputs: list[Partial | None], index: int, name: str, opset: int,
                   since: int) -> list[int] | None:
    """Opset-dependent operands that moved from attributes to inputs (axes, starts, ...)."""
    if opset < since:
        value = node.attr(name)
        return None if value is None else list(value)
    return _ints(inputs[index]) if index < len(inputs) else None


@rule("Shape")
def _shape(node: Node, inputs, opset):
    value = node.inputs[0]
    if value.shape is None:
        return [None]
    rank = len(value.shape)
    axes = range(rank)[slice(node.attr("start", 0), node.attr("end", rank))]
    return [Partial(_INT64, objects([dim_symbol(value, a) for a in axes], (len(axes),)))]


@rule("Size")
def _size(node: Node, inputs, opset):
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return [None]
    return [Partial(_INT64, objects([math.prod(shape)], ()))]


@rule("Identity")
def _identity(node, inputs, opset):
    return [inputs[0]]


@rule("Cast")
def _cast(node, inputs, opset):
    p, to = inputs[0], node.attr("to")
    if p is None or to not in INT_TYPES:
        return [None]
    if p.known:
        from graphopt.ir.tensor import numpy_dtype

        return [from_array(p.numpy().astype(numpy_dtype(to)), to)]
    if to == _BOOL:
        return [Partial(to, _map(p.array, lambda e: int(bool(e)) if isinstance(e, int) else None))]
    if to not in (_INT64, onnx.TensorProto.INT32) or p.elem_type not in (_INT64, onnx.TensorProto.INT32):
        return [None]
    info = np.iinfo(np.int64 if to == _INT64 else np.int32)
    return [Partial(to, _map(p.array, lambda e: e if not isinstance(e, int) or info.min <= e <= info.max
                             else None))]


@rule("Unsqueeze")
def _unsqueeze(node, inputs, opset):
    p, axes = inputs[0], _attr_or_input(node, inputs, 1, "axes", opset, 13)
    if p is None or axes is None:
        return [None]
    rank = p.array.ndim + len(axes)
    shape = list(p.array.shape)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        shape.insert(axis, 1)  # (reshape, not np.expand_dims: this runs per node on 200k-node graphs)
    return [Partial(p.elem_type, p.array.reshape(shape))]


@rule("Squeeze")
def _squeeze(node, inputs, opset):
    p = inputs[0]
    axes = _attr_or_input(node, inputs, 1, "axes", opset, 13)
    if p is None:
        return [None]
    if axes is None and (opset >= 13 and len(node.inputs) > 1 and node.inputs[1] is not None):
        return [None]
    rank = p.array.ndim
    drop = {a + rank if a < 0 else a for a in axes} if axes is not None else {
        i for i, d in enumerate(p.array.shape) if d == 1}
    if any(p.array.shape[a] != 1 for a in drop):
        return [None]
    return [Partial(p.elem_type, p.array.reshape([d for i, d in enumerate(p.array.shape) if i not in drop]))]


@rule("Reshape")
def _reshape(node, inputs, opset):
    p, target = inputs[0], _ints(inputs[1])
    if p is None or target is None:
        return [None]
    if not node.attr("allowzero", 0):
        target = [p.array.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return [Partial(p.elem_type, p.array.reshape(target))]


@rule("Flatten")
def _flatten(node, inputs, opset):
    p = inputs[0]
    if p is None:
        return [None]
    axis = node.attr("axis", 1)
    axis = axis + p.array.ndim if axis < 0 else axis
    return [Partial(p.elem_type, p.array.reshape(math.prod(p.array.shape[:axis]), -1))]


@rule("Concat")
def _concat(node, inputs, opset):
    parts = [p if p is not None else unknown(v) for p, v in zip(inputs, node.inputs, strict=True)]
    if not parts or any(p is None for p in parts):
        return [None]
    return [Partial(parts[0].elem_type, np.concatenate([p.array for p in parts], axis=node.attr("axis")))]


@rule("Gather")
def _gather(node, inputs, opset):
    p, indices = inputs[0], inputs[1]
    if p is None or indices is None or not indices.known:
        return [None]
    idx = indices.numpy().astype(np.int64)
    return [Partial(p.elem_type, _as_objects(np.take(p.array, idx, axis=node.attr("axis", 0))))]


@rule("Slice")
def _slice(node, inputs, opset):
    p = inputs[0]
    if p is None:
        return [None]
    starts = _attr_or_input(node, inputs, 1, "starts", opset, 10)
    ends = _attr_or_input(node, inputs, 2, "ends", opset, 10)
    axes = _attr_or_input(node, inputs, 3, "axes", opset, 10)
    steps = _ints(inputs[4]) if opset >= 10 and len(inputs) > 4 else None
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        return [None]
    if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
        return [None]
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index = [slice(None)] * p.array.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[axis] = slice(start, end, step)
    return [Partial(p.elem_type, p.array[tuple(index)])]


@rule("Transpose")
def _transpose(node, inputs, opset):
    p = inputs[0]
    return [None] if p is None else [Partial(p.elem_type, np.transpose(p.array, node.attr("perm")))]


@rule("Expand")
def _expand(node, inputs, opset):
    p, shape = inputs[0], _ints(inputs[1])
    if p is None or shape is None:
        return [None]
    out = np.broadcast_shapes(p.array.shape, tuple(shape))
    return [Partial(p.elem_type, np.array(np.broadcast_to(p.array, out)))]


@rule("ConstantOfShape")
def _constant_of_shape(node, inputs, opset):
    shape = _ints(inputs[0])
    tensor = node.attr("value")
    if shape is None or math.prod(shape) > MAX_ELEMENTS:
        return [None]
    fill, elem_type = (0, onnx.TensorProto.FLOAT) if tensor is None else (tensor.numpy().reshape(-1)[0],
                                                                         tensor.elem_type)
    if elem_type not in INT_TYPES:
        return [None]
    return [Partial(elem_type, objects([int(fill)] * math.prod(shape), tuple(shape)))]


@rule("Range")
def _range(node, inputs, opset):
    args = [_ints(p) for p in inputs[:3]]
    if any(a is None or len(a) != 1 for a in args) or inputs[0] is None:
        return [None]
    (start,), (limit,), (delta,) = args
    count = max(-((start - limit) // delta), 0)
    if count > MAX_ELEMENTS:
        return [None]
    return [Partial(inputs[0].elem_type, objects([start + i * delta for i in range(count)], (count,)))]


# -- elementwise -------------------------------------------------------------------------------
def _map(array: np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    return objects([fn(e) for e in array.flat], array.shape)


def _as_objects(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return objects([x], ())


def _elementwise(fn: Callable[..., Any], parts: list[Partial], elem_type: int) -> Partial:
    arrays = np.broadcast_arrays(*[p.array for p in parts])
    items = [fn(*es) for es in zip(*(a.flat for a in arrays), strict=True)]
    return Partial(elem_type, objects(items, arrays[0].shape))


def _binary(fn: Callable[[Any, Any], Any], out_type: int | None = None) -> Rule:
    def apply(node, inputs, opset):
        if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
            return [None]
        return [_elementwise(fn, inputs[:2], out_type or inputs[0].elem_type)]
    return apply


def _int_pair(a: Any, b: Any) -> bool:
    return isinstance(a, int) and isinstance(b, int)


def _add(a, b):
    if _int_pair(a, b):
        return _fits(a + b)
    return a if b == 0 and is_symbol(a) else b if a == 0 and is_symbol(b) else None


def _sub(a, b):
    if _int_pair(a, b):
        return _fits(a - b)
    return a if b == 0 and is_symbol(a) else 0 if is_symbol(a) and a == b else None


def _mul(a, b):
    if _int_pair(a, b):
        return _fits(a * b)
    if b == 1 and is_symbol(a):
        return a
    return b if a == 1 and is_symbol(b) else 0 if 0 in (a, b) and (is_symbol(a) or is_symbol(b)) else None


def _div(a, b):
    if _int_pair(a, b):
        if b == 0:
            return None
        q = abs(a) // abs(b)  # onnxruntime's integer Div truncates toward zero
        return q if (a >= 0) == (b >= 0) else -q
    return a if b == 1 and is_symbol(a) else None


def _equal(a, b):
    if _int_pair(a, b):
        return int(a == b)
    if is_symbol(a) and is_symbol(b) and a == b:
        return 1
    if is_symbol(a) and isinstance(b, int) and b < 0 or is_symbol(b) and isinstance(a, int) and a < 0:
        return 0  # a dim is never negative
    return None


def _max(a, b):
    if _int_pair(a, b):
        return max(a, b)
    if a == b and a is not None:
        return a
    return a if is_symbol(a) and isinstance(b, int) and b <= 0 else b if is_symbol(b) and isinstance(
        a, int) and a <= 0 else None


def _min(a, b):
    if _int_pair(a, b):
        return min(a, b)
    if a == b and a is not None:
        return a
    return b if is_symbol(a) and isinstance(b, int) and b <= 0 else a if is_symbol(b) and isinstance(
        a, int) and a <= 0 else None


def _fits(x: int) -> int | None:
    return x if -(2**63) <= x < 2**63 else None


RULES.update({
    "Add": _binary(_add), "Sub": _binary(_sub), "Mul": _binary(_mul), "Div": _binary(_div),
    "Equal": _binary(_equal, _BOOL),
})


def _variadic(fn: Callable[[Any, Any], Any]) -> Rule:
    def apply(node, inputs, opset):
        if not inputs or any(p is None for p in inputs):
            return [None]
        out = inputs[0]
        for p in inputs[1:]:
            out = _elementwise(fn, [out, p], out.elem_type)
        return [out]
    return apply


RULES.update({"Max": _variadic(_max), "Min": _variadic(_min)})


@rule("Where")
def _where(node, inputs, opset):
    if any(p is None for p in inputs[:3]):
        return [None]

    def pick(c, x, y):
        if isinstance(c, int):
            return x if c else y
        return x if x == y and x is not None else None

    return [_elementwise(pick, inputs[:3], inputs[1].elem_type)]


@rule("Neg")
def _neg(node, inputs, opset):
    p = inputs[0]
    return [None] if p is None else [Partial(p.elem_type, _map(p.array, lambda e: -e if isinstance(e, int)
                                                                else None))]


@rule("Abs")
def _abs(node, inputs, opset):
    p = inputs[0]
    return [None] if p is None else [Partial(p.elem_type, _map(p.array, lambda e: abs(e) if isinstance(e, int)
                                                                else e))]
