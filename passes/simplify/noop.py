"""``eliminate-noops``: remove ops that compute their input, and collapse chains of layout ops.

Each rule is a row of :data:`NOOP_RULES` (name, op types, a check that says why
not, a replacement). They fire only when the result is provably the same
tensor — same shape, same dtype, same values — for every input the original
graph accepts; missing shape or type information means "don't know", never
"probably fine". ``explain(model)`` lists why each near miss did not fire.

Two things are accepted on purpose: ``x + 0`` turns ``-0.0`` into ``+0.0``
(they compare equal), and a rewrite may let a graph run that would have failed
(``Unsqueeze(Squeeze(x, a), a)`` is ``x`` whenever the Squeeze is valid).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from graphopt.ir import Model
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

from . import view_region
from .rules import Rejection, Rule, RuleTable, Site
from .util import normalize_axes, reshape_target, same_dim, symbolic_shape, view_shape
from .view_region import VIEW_OPS

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1

_T = onnx.TensorProto
_FLOATS = (_T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE)
EXACT_WIDENING: dict[int, tuple[int, ...]] = {
    _T.BOOL: (_T.INT8, _T.INT16, _T.INT32, _T.INT64, _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64, *_FLOATS),
    _T.INT8: (_T.INT16, _T.INT32, _T.INT64, *_FLOATS),
    _T.UINT8: (_T.UINT16, _T.UINT32, _T.UINT64, _T.INT16, _T.INT32, _T.INT64, *_FLOATS),
    _T.INT16: (_T.INT32, _T.INT64, _T.FLOAT, _T.DOUBLE),
    _T.UINT16: (_T.UINT32, _T.UINT64, _T.INT32, _T.INT64, _T.FLOAT, _T.DOUBLE),
    _T.INT32: (_T.INT64, _T.DOUBLE),
    _T.UINT32: (_T.UINT64, _T.INT64, _T.DOUBLE),
    _T.FLOAT16: (_T.FLOAT, _T.DOUBLE),
    _T.BFLOAT16: (_T.FLOAT, _T.DOUBLE),
    _T.FLOAT: (_T.DOUBLE,),
}
"""Casts x -> W that keep every value of x exactly, so casting back to x's type gives x."""


def _type_name(elem_type: int | None) -> str:
    return "unknown" if elem_type is None else onnx.TensorProto.DataType.Name(elem_type).lower()


def _first(site: Site):
    return site.node.inputs[0]


def _inner_input(site: Site, *op_types: str):
    producer = site.producer(0, *op_types)
    assert producer is not None
    return producer.inputs[0]


# -- casts ---------------------------------------------------------------------------
def _cast_same_type(site: Site) -> str | None:
    source = site.input(0)
    to = site.node.attr("to")
    if source is None or source.elem_type is None:
        return "the input's element type is unknown"
    return None if source.elem_type == to else f"casts {_type_name(source.elem_type)} to {_type_name(to)}"


def _castlike_same_type(site: Site) -> str | None:
    source, like = site.input(0), site.input(1)
    if source is None or like is None or source.elem_type is None or like.elem_type is None:
        return "an element type is unknown"
    return None if source.elem_type == like.elem_type else "the types differ"


def _cast_roundtrip(site: Site) -> str | None:
    inner = site.producer(0, "Cast")
    if inner is None or inner.inputs[0] is None:
        return "the input is not a Cast"
    source, wide, back = inner.inputs[0].elem_type, inner.attr("to"), site.node.attr("to")
    if source is None:
        return "the inner Cast's input type is unknown"
    if back != source:
        return f"casts {_type_name(source)} -> {_type_name(wide)} -> {_type_name(back)}, not back to the start"
    if wide not in EXACT_WIDENING.get(source, ()):
        return f"{_type_name(source)} -> {_type_name(wide)} is not exact"
    return None


# -- reshapes and other views --------------------------------------------------------
def _reshape_same_shape(site: Site) -> str | None:
    target = site.ints(1)
    source = site.input(0)
    if target is None:
        return "the target shape is not a constant"
    shape = source.shape if source is not None else None
    if shape is None:
        return "the input shape is unknown"
    if len(target) != len(shape):
        return f"changes the rank ({len(shape)} -> {len(target)})"
    allowzero, minus = site.node.attr("allowzero", 0), 0
    for t, d in zip(target, shape, strict=True):
        if t == 0 and not allowzero:
            continue  # copies the input dim
        if t == -1:
            minus += 1
            continue
        if not (isinstance(d, int) and d == t):
            return f"target {target} does not provably equal the input shape {list(shape)}"
    return None if minus <= 1 else "more than one -1"


def _reshape_of_view(site: Site) -> str | None:
    inner = site.producer(0, *VIEW_OPS)
    target = site.ints(1)
    if inner is None or inner.inputs[0] is None:
        return "the input is not a Reshape/Squeeze/Unsqueeze/Flatten"
    if target is None:
        return "the target shape is not a constant"
    if site.node.attr("allowzero", 0) or 0 not in target:
        return None
    source = symbolic_shape(inner.inputs[0])
    middle = _view_result(site.at(inner), source) if source is not None else None
    if middle is None:
        return "the target copies dims (0) of the intermediate, whose shape is unknown"
    for j, t in enumerate(target):
        if t == 0 and not (j < len(source) and j < len(middle) and same_dim(source[j], middle[j])):
            return f"target copies dim {j}, which the inner {inner.op_type} changes"
    return None


def _view_result(site: Site, shape: list | None) -> list | None:
    """The output shape of the view op at ``site`` applied to a symbolic ``shape``."""
    node = site.node
    if shape is None:
        return None
    axes = site.ints_or_attr(1, "axes") if node.op_type in ("Squeeze", "Unsqueeze") else None
    axes = axes or None  # an empty Squeeze axes list means "all unit dims", like none
    target = site.ints(1) if node.op_type == "Reshape" else None
    return view_shape(node.op_type, shape, axes=axes, axis=node.attr("axis", 1), target=target,
                      allowzero=node.attr("allowzero", 0))


def _rewire_to_inner(site: Site) -> None:
    site.node.set_input(0, _inner_input(site, *VIEW_OPS))


def _chain_target(site: Site) -> list[int] | None:
    inner = site.producer(0, *VIEW_OPS)
    if inner is None or inner.inputs[0] is None:
        return None
    source = symbolic_shape(inner.inputs[0])
    result = _view_result(site, _view_result(site.at(inner), source))
    return reshape_target(source, result) if source is not None and result is not None else None


def _view_chain(site: Site) -> str | None:
    inner = site.producer(0, *VIEW_OPS)
    if inner is None or inner.inputs[0] is None:
        return "the input is not a Reshape/Squeeze/Unsqueeze/Flatten"
    if len(inner.outputs[0].uses()) != 1 or site.scope.is_output(inner.outputs[0]):
        return f"the inner {inner.op_type}'s output is used elsewhere (merging would not remove a node)"
    if inner.inputs[0].shape is None:
        return "the chain's input shape is unknown"
    if _chain_target(site) is None:
        return "the result shape cannot be written as one Reshape target (static dims, 0 copies, one -1)"
    return None


def _view_chain_reshape(site: Site):
    target = _chain_target(site)
    source = _inner_input(site, *VIEW_OPS)
    return site.add_node("Reshape", [source, site.constant(np.asarray(target, np.int64), "shape")],
                         rule="view-chain-to-reshape")


def _flatten_2d(site: Site) -> str | None:
    shape = site.input(0).shape if site.input(0) is not None else None
    if shape is None or len(shape) != 2:
        return "the input is not known to be 2-D"
    return None if site.node.attr("axis", 1) in (1, -1) else "axis is not 1"


def _rank(value) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _pair_axes(site: Site, inner_op: str) -> tuple[list[int], list[int]] | str:
    """Normalized axes of a Squeeze/Unsqueeze over a Squeeze/Unsqueeze (outer, inner), or why not known.

    Unsqueeze axes index its output, Squeeze axes its input; negative axes need the rank.
    """
    inner = site.producer(0, inner_op)
    if inner is None or inner.inputs[0] is None:
        return f"the input is not an {inner_op}"
    inner_axes = site.at(inner).ints_or_attr(1, "axes")
    outer_axes = site.ints_or_attr(1, "axes")
    if not inner_axes or not outer_axes:
        return "the axes are not constants (or a Squeeze has none: squeeze all)"
    rank = _rank(inner.inputs[0])
    grow = {"Unsqueeze": 1, "Squeeze": -1}
    middle = rank + grow[inner_op] * len(inner_axes) if rank is not None else None
    inner_rank = middle if inner_op == "Unsqueeze" else rank
    outer_rank = middle + len(outer_axes) if middle is not None and site.node.op_type == "Unsqueeze" else middle
    a, b = normalize_axes(inner_axes, inner_rank), normalize_axes(outer_axes, outer_rank)
    if a is None or b is None:
        return "negative axes and the input rank is unknown (or axes out of range)"
    return b, a


def _inverse_pair(inner_op: str):
    def check(site: Site) -> str | None:
        axes = _pair_axes(site, inner_op)
        if isinstance(axes, str):
            return axes
        outer, inner = axes
        return None if sorted(outer) == sorted(inner) else f"different axes ({inner} then {outer})"

    return check


def _same_pair(site: Site) -> str | None:
    axes = _pair_axes(site, site.node.op_type)
    return axes if isinstance(axes, str) else None


def _first_not_in(excluded: list[int], count: int) -> list[int]:
    """The first ``count`` non-negative integers not in ``excluded``."""
    out, i, skip = [], 0, set(excluded)
    while len(out) < count:
        if i not in skip:
            out.append(i)
        i += 1
    return out


def _merged_axes(site: Site) -> list[int]:
    """Axes of one Unsqueeze (Squeeze) doing what two nested ones do."""
    outer, inner = _pair_axes(site, site.node.op_type)  # type: ignore[misc]
    if site.node.op_type == "Unsqueeze":  # the inner one's dims land in the slots the outer one leaves free
        slots = _first_not_in(outer, max(inner) + 1)
        return sorted(outer + [slots[p] for p in inner])
    kept = _first_not_in(inner, max(outer) + 1)  # the outer Squeeze's dim q is the q-th dim of x not squeezed
    return sorted(inner + [kept[q] for q in outer])


def _merge_pair(site: Site) -> None:
    node, axes = site.node, _merged_axes(site)
    node.set_input(0, _inner_input(site, node.op_type))
    if "axes" in node.attrs:
        node.set_attr("axes", axes)
    else:
        node.set_input(1, site.constant(np.asarray(axes, np.int64), "axes"))


# -- a reduction with keepdims, then a view that drops the kept unit dims ------------------
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def _reduce_then_drop(site: Site) -> str | None:
    """The view at ``site`` only removes the unit dims its Reduce producer kept (keepdims=1)."""
    reduce = site.producer(0, *REDUCE_OPS)
    if reduce is None or reduce.inputs[0] is None:
        return "the input is not a Reduce op"
    if not reduce.attr("keepdims", 1):
        return "the Reduce already drops its axes"
    if len(reduce.outputs[0].uses()) != 1 or site.scope.is_output(reduce.outputs[0]):
        return "the Reduce's output is used elsewhere"
    source = symbolic_shape(reduce.inputs[0])
    if source is None:
        return "the Reduce's input rank is unknown"
    axes = site.at(reduce).ints_or_attr(1, "axes")
    if not axes:
        if reduce.attr("noop_with_empty_axes", 0):
            return "no axes and noop_with_empty_axes"
        axes = list(range(len(source)))
    axes = normalize_axes(axes, len(source))
    if axes is None:
        return "the axes are out of range"
    kept = [1 if i in axes else d for i, d in enumerate(source)]
    dropped = [d for i, d in enumerate(source) if i not in axes]
    result = _view_result(site, kept)
    if result is None or len(result) != len(dropped) or not all(map(same_dim, result, dropped)):
        return "the view does not just drop the reduced dims"
    return None


def _drop_reduced_dims(site: Site):
    reduce = site.producer(0, *REDUCE_OPS)
    reduce.set_attr("keepdims", 0)
    reduce.outputs[0].type = site.node.outputs[0].type
    return reduce.outputs[0]


# -- transposes ----------------------------------------------------------------------
def _perm(site: Site) -> list[int] | None:
    """The permutation of the Transpose at ``site`` (the default reverses the dims: needs the rank)."""
    perm = site.node.attr("perm")
    if perm is not None:
        return [int(p) for p in perm]
    rank = _rank(site.input(0))
    return list(reversed(range(rank))) if rank is not None else None


def _transpose_identity(site: Site) -> str | None:
    perm = _perm(site)
    if perm is None:
        return "no perm and the input rank is unknown"
    return None if perm == list(range(len(perm))) else f"perm {perm} is not the identity"


def _composed_perm(site: Site) -> list[int] | str:
    inner = site.producer(0, "Transpose")
    if inner is None or inner.inputs[0] is None:
        return "the input is not a Transpose"
    first, second = _perm(site.at(inner)), _perm(site)
    if first is None and second is not None:  # a missing perm reverses the dims: the other tells the rank
        first = list(reversed(range(len(second))))
    if second is None and first is not None:
        second = list(reversed(range(len(first))))
    if first is None or second is None:
        return "both perms are missing and the rank is unknown"
    if len(first) != len(second):
        return "the perms have different lengths"
    return [first[p] for p in second]


def _transpose_pair_cancel(site: Site) -> str | None:
    perm = _composed_perm(site)
    if isinstance(perm, str):
        return perm
    return None if perm == list(range(len(perm))) else f"the composed perm {perm} is not the identity"


def _transpose_pair_compose(site: Site) -> str | None:
    perm = _composed_perm(site)
    return perm if isinstance(perm, str) else None


def _compose_transposes(site: Site) -> None:
    perm = _composed_perm(site)
    site.node.set_input(0, _inner_input(site, "Transpose"))
    site.node.set_attr("perm", perm)


# -- arithmetic with a neutral constant ----------------------------------------------
def _neutral_operand(site: Site, neutral: float, positions: tuple[int, ...]) -> int | str:
    """The position of an all-``neutral`` constant operand that broadcasting cannot grow past
    the other operand's shape, or why there is none."""
    reasons = []
    for pos in positions:
        if len(site.node.inputs) != 2 or site.input(1 - pos) is None:
            return "not a binary op"
        value = site.const(pos)
        if value is None:
            reasons.append(f"operand {pos} is not a (small) constant")
        elif not np.all(value == neutral):
            reasons.append(f"operand {pos} is not all {neutral:g}")
        else:
            why = _broadcast_keeps(site.input(1 - pos).shape, value.shape)
            if why is None:
                return pos
            reasons.append(why)
    return "; ".join(reasons)


def _neutral(op: str, neutral: float, positions: tuple[int, ...], doc: str) -> Rule:
    """``op`` with one operand all ``neutral`` (at one of ``positions``) returns the other operand."""

    def check(site: Site) -> str | None:
        found = site.memo["neutral"] = _neutral_operand(site, neutral, positions)
        return found if isinstance(found, str) else None

    def target(site: Site):
        return site.node.inputs[1 - site.memo["neutral"]]

    return Rule(f"{op.lower()}-{'zero' if neutral == 0 else 'one'}", (op,), check, target=target, doc=doc)


def _broadcast_keeps(shape: tuple | None, const_shape: tuple) -> str | None:
    """None if broadcasting a tensor of ``shape`` with one of ``const_shape`` yields ``shape``."""
    if shape is None:
        return None if len(const_shape) == 0 else "the input rank is unknown and the constant is not a scalar"
    if len(const_shape) > len(shape):
        return f"the constant's rank {len(const_shape)} exceeds the input's {len(shape)}: broadcasting enlarges it"
    for c, d in zip(reversed(const_shape), reversed(shape), strict=False):
        if c != 1 and not (isinstance(d, int) and d == c):
            return f"the constant's shape {list(const_shape)} may enlarge the input shape {list(shape)}"
    return None


# -- pads, slices, expands, tiles, concat, split -------------------------------------
def _pad_zero(site: Site) -> str | None:
    pads = site.ints_or_attr(1, "pads")
    if pads is None:
        return "the pads are not constants"
    return None if not any(pads) else f"pads {pads} are not all zero"


def _slice_all(site: Site) -> str | None:
    starts, ends = site.ints_or_attr(1, "starts"), site.ints_or_attr(2, "ends")
    if starts is None or ends is None:
        return "starts/ends are not constants"
    axes = site.ints_or_attr(3, "axes") if site.input(3) is not None or "axes" in site.node.attrs else None
    steps = site.ints(4) if site.input(4) is not None else [1] * len(starts)
    axes = list(range(len(starts))) if axes is None else axes
    if steps is None or axes is None:
        return "axes/steps are not constants"
    shape = site.input(0).shape if site.input(0) is not None else None
    axes = normalize_axes(axes, len(shape) if shape is not None else None)
    if axes is None:
        return "negative axes and the input rank is unknown"
    if not len(starts) == len(ends) == len(axes) == len(steps):
        return "starts/ends/axes/steps differ in length"
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = shape[axis] if shape is not None else None
        if step != 1:
            return f"step {step} on axis {axis}"
        if start != 0 and not (isinstance(dim, int) and start <= -dim):
            return f"starts at {start} on axis {axis}"
        if not (end >= INT64_MAX or (isinstance(dim, int) and end >= dim)):
            return f"ends at {end} on axis {axis} of size {dim if dim is not None else 'unknown'}"
    return None


def _expand_same_shape(site: Site) -> str | None:
    shape = site.ints(1)
    if shape is None:
        return "the shape is not a constant"
    return _broadcast_keeps(site.input(0).shape if site.input(0) is not None else None, tuple(shape))


def _tile_ones(site: Site) -> str | None:
    repeats = site.ints(1)
    if repeats is None:
        return "the repeats are not constants"
    return None if all(r == 1 for r in repeats) else f"repeats {repeats} are not all one"


def _single_input(site: Site) -> str | None:
    return None if len(site.node.inputs) == 1 and site.input(0) is not None else "more than one input"


def _single_output(site: Site) -> str | None:
    return None if len(site.node.outputs) == 1 and site.input(0) is not None else "more than one output"


NOOP_RULES = RuleTable([
    Rule("cast-same-type", ("Cast",), _cast_same_type, target=_first, doc="Cast to the input's own type"),
    Rule("cast-roundtrip", ("Cast",), _cast_roundtrip, target=lambda s: _inner_input(s, "Cast"),
         doc="Cast(Cast(x, W), type(x)) where x -> W is exact"),
    Rule("castlike-same-type", ("CastLike",), _castlike_same_type, target=_first),
    Rule("reshape-same-shape", ("Reshape",), _reshape_same_shape, target=_first),
    Rule("reshape-of-view", ("Reshape",), _reshape_of_view, rewrite=_rewire_to_inner,
         doc="Reshape(view(x), s) -> Reshape(x, s) when s copies no dim the view changed"),
    Rule("unsqueeze-squeeze", ("Squeeze",), _inverse_pair("Unsqueeze"), target=lambda s: _inner_input(s, "Unsqueeze")),
    Rule("squeeze-unsqueeze", ("Unsqueeze",), _inverse_pair("Squeeze"), target=lambda s: _inner_input(s, "Squeeze"),
         doc="Unsqueeze(Squeeze(x, a), a) is x whenever the Squeeze is valid"),
    Rule("merge-squeezes", ("Squeeze", "Unsqueeze"), _same_pair, rewrite=_merge_pair,
         doc="Unsqueeze(Unsqueeze(x)) -> one Unsqueeze; Squeeze(Squeeze(x)) -> one Squeeze"),
    Rule("flatten-2d", ("Flatten",), _flatten_2d, target=_first),
    Rule("reduce-keepdims-then-drop", ("Reshape", "Squeeze", "Flatten"), _reduce_then_drop,
         rewrite=_drop_reduced_dims, doc="Reshape(ReduceMean(x, keepdims=1)) dropping the unit dims -> keepdims=0"),
    Rule("view-around-elementwise", VIEW_OPS, view_region.check, rewrite=view_region.rewrite,
         doc="view2(f(view1(x))) -> f(x) for elementwise f when view2 gives back x's shape (GELU between Gemms)"),
    Rule("view-chain-to-reshape", ("Squeeze", "Unsqueeze", "Flatten"), _view_chain, rewrite=_view_chain_reshape,
         doc="two view ops -> one Reshape when the result shape is expressible"),
    Rule("transpose-identity", ("Transpose",), _transpose_identity, target=_first),
    Rule("transpose-pair-cancel", ("Transpose",), _transpose_pair_cancel,
         target=lambda s: _inner_input(s, "Transpose")),
    Rule("transpose-pair-compose", ("Transpose",), _transpose_pair_compose, rewrite=_compose_transposes),
    _neutral("Add", 0, (1, 0), "x + 0 and 0 + x (-0.0 becomes +0.0, which compares equal)"),
    _neutral("Sub", 0, (1,), "x - 0 (exact)"),
    _neutral("Mul", 1, (1, 0), "x * 1 and 1 * x (exact, integers too)"),
    _neutral("Div", 1, (1,), "x / 1 (exact, integers too)"),
    Rule("pad-zero", ("Pad",), _pad_zero, target=_first),
    Rule("slice-all", ("Slice",), _slice_all, target=_first),
    Rule("expand-same-shape", ("Expand",), _expand_same_shape, target=_first),
    Rule("tile-ones", ("Tile",), _tile_ones, target=_first),
    Rule("concat-single", ("Concat",), _single_input, target=_first),
    Rule("split-single", ("Split",), _single_output, target=_first),
])
"""Every rule of ``eliminate-noops``, in the order they are tried on a node."""


@register_pass
class EliminateNoops(Pass):
    name = "eliminate-noops"
    description = "Remove ops that return their input (same-type Cast, identity Transpose, x+0, ...), merge view chains"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fired = NOOP_RULES.apply(model)
        return PassResult(sum(fired.values()), {"rules": dict(fired)})


def explain(model: Model) -> list[Rejection]:
    """Apply the rules to ``model`` (it changes) and list why each rule that looked at a node did not fire."""
    rejections: list[Rejection] = []
    NOOP_RULES.apply(model, explain=rejections)
    return rejections
