"""Rules for ops that move channels around without computing on them.

Concat and Split place channels at offsets, Slice keeps a window, Transpose
moves the axis, and the reshape family (Reshape, Flatten, Squeeze, Unsqueeze)
splits or merges axes: a conv channel flattened into a Gemm becomes a block of
H*W features, and a projection's output reshaped to (batch, seq, heads,
head_dim) becomes heads, which is how attention heads are found without a
pattern for attention. Reshapes are read from the probed shapes (two runs), so
a target shape computed at runtime is understood as long as the entry that
holds the channel count can be rewritten after pruning.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Node

from .rules import AxisClass, Member, NodeView, blocked_classes, identity_classes, rule


@rule("Transpose")
def transpose(view: NodeView) -> list[AxisClass] | str:
    y = view.static(("out", 0))
    if y is None:
        return "Transpose with unknown shape"
    perm = view.attr("perm") or list(reversed(range(len(y))))
    return [AxisClass(f"axis{i}", size, [Member(("out", 0), i), Member(("in", 0), perm[i])])
            for i, size in enumerate(y) if size is not None]


@rule("Concat")
def concat(view: NodeView) -> list[AxisClass] | str:
    y = view.static(("out", 0))
    ins = [("in", i) for i in range(view.n_in)]
    shapes = [view.static(p) for p in ins]
    if y is None or any(s is None for s in shapes):
        return "Concat with unknown shapes"
    axis = int(view.attr("axis")) % len(y)
    out = identity_classes(view, [("out", 0), *ins], skip={axis})
    if y[axis] is None:
        return out
    members, offset = [Member(("out", 0), axis)], 0
    for port, shape in zip(ins, shapes, strict=True):
        if shape[axis] is None:
            return out + blocked_classes(view, [("out", 0)], {axis}, "Concat of an input of dynamic size on this axis")
        members.append(Member(port, axis, offset + np.arange(shape[axis])))
        offset += shape[axis]
    return [*out, AxisClass("concat", y[axis], members)]


@rule("Split")
def split(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    outs = [("out", i) for i in range(view.n_out)]
    shapes = [view.static(p) for p in outs]
    if x is None or any(s is None for s in shapes):
        return "Split with unknown shapes"
    axis = int(view.attr("axis", 0)) % len(x)
    out = identity_classes(view, [("in", 0), *outs], skip={axis})
    if x[axis] is None or any(s[axis] is None for s in shapes):
        return out
    if view.n_in > 1 and view.value(("in", 1)) is not None and view.const(("in", 1)) is None:
        return out + blocked_classes(view, [("in", 0)], {axis}, "Split sizes computed at runtime")
    members, offset = [Member(("in", 0), axis)], 0
    for port, shape in zip(outs, shapes, strict=True):
        members.append(Member(port, axis, offset + np.arange(shape[axis])))
        offset += shape[axis]
    return [*out, AxisClass("split", x[axis], members, fixup=True)]


def slice_params(view: NodeView, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """{axis: (start, end, step)} of a Slice with constant parameters (None if any is computed at runtime)."""
    if view.n_in == 1:  # opset < 10: attributes
        starts, ends = view.attr("starts"), view.attr("ends")
        axes, steps = view.attr("axes") or list(range(len(starts))), [1] * len(starts)
    else:
        consts = [view.const(("in", i)) if i < view.n_in and view.value(("in", i)) is not None else "absent"
                  for i in range(1, 5)]
        if any(c is None for c in consts):
            return None
        starts, ends = consts[0].tolist(), consts[1].tolist()
        axes = list(range(len(starts))) if isinstance(consts[2], str) else consts[2].tolist()
        steps = [1] * len(starts) if isinstance(consts[3], str) else consts[3].tolist()
    return {int(a) % rank: (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps, strict=True)}


@rule("Slice")
def slice_(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return "Slice with unknown shape"
    params = slice_params(view, len(x))
    if params is None:
        return "Slice with starts/ends/axes/steps computed at runtime"
    out = identity_classes(view, [("in", 0), ("out", 0)], skip=set(params))
    for axis, (start, end, step) in params.items():
        if x[axis] is None:
            continue
        if step != 1:
            out += blocked_classes(view, [("in", 0), ("out", 0)], {axis}, "Slice with a step other than 1")
            continue
        kept = np.arange(x[axis])[start:end]
        out.append(AxisClass(f"slice{axis}", x[axis], [Member(("in", 0), axis), Member(("out", 0), axis, kept)],
                             fixup=True))
    return out


# -- reshape family ----------------------------------------------------------------------------
def segments(ins, outs) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes holding the same elements.

    ``ins``/``outs`` are (probe A, probe B) size pairs; axes of size 1 in both
    probes carry no elements and are left out. None when the runs do not line up.
    """
    ni = [i for i, p in enumerate(ins) if p != (1, 1)]
    no = [j for j, p in enumerate(outs) if p != (1, 1)]
    segs, i, j = [], 0, 0
    while i < len(ni) and j < len(no):
        run_i, run_o = [ni[i]], [no[j]]
        pi, po = ins[ni[i]], outs[no[j]]
        i, j = i + 1, j + 1
        while pi != po:
            grow_in = (pi[1], pi[0]) < (po[1], po[0])
            if grow_in and i < len(ni):
                run_i.append(ni[i])
                pi = (pi[0] * ins[ni[i]][0], pi[1] * ins[ni[i]][1])
                i += 1
            elif not grow_in and j < len(no):
                run_o.append(no[j])
                po = (po[0] * outs[no[j]][0], po[1] * outs[no[j]][1])
                j += 1
            else:
                return None
        segs.append((run_i, run_o))
    return segs if i == len(ni) and j == len(no) else None


def target_piece(producer: Node | None, out_axis: int, static) -> tuple[int, int] | None:
    """Which input of a Concat-built Reshape target holds entry ``out_axis``, and the entry's offset in it
    (``static``: a value's static shape); None when the target is not such a Concat or a piece's length is
    unknown. Exported code writes ``x.view(x.shape[:-1] + (n,))``: a runtime slice of Shape, then constants."""
    if producer is None or producer.op_type != "Concat":
        return None
    start = 0
    for index, piece in enumerate(producer.inputs):
        shape = static(piece)
        if shape is None or len(shape) != 1 or shape[0] is None:
            return None
        if out_axis < start + shape[0]:
            return index, out_axis - start
        start += shape[0]
    return None


def _shape_entry_problem(view: NodeView, out_axis: int, same_axis_identity: bool) -> str | None:
    """Why the Reshape's target entry for ``out_axis`` could not be rewritten after pruning (None: it can)."""
    if view.node.op_type != "Reshape":
        return None
    shape_value = view.value(("in", 1))
    const = view.const(("in", 1))
    if const is not None:
        entry = int(const.reshape(-1)[out_axis])
    else:
        producer = shape_value.producer if shape_value is not None else None
        found = target_piece(producer, out_axis, view.shapes.static)
        if found is None:
            return "Reshape target shape computed at runtime"
        piece, offset = producer.inputs[found[0]], found[1]
        if piece.const is None:
            return "Reshape target entry for the channel axis is computed at runtime"
        entry = int(piece.const.numpy().reshape(-1)[offset])
    if entry == 0 and int(view.attr("allowzero", 0)):
        return "Reshape with allowzero: a 0 entry is a literal empty dim"
    if entry == 0 and not same_axis_identity:
        return "Reshape copies this dim (0) from another input axis"
    return None


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(view: NodeView) -> list[AxisClass] | str:
    ins, outs = view.pairs(("in", 0)), view.pairs(("out", 0))
    if ins is None or outs is None:
        return f"{view.node.op_type} with unknown shapes"
    segs = segments(ins, outs)
    if segs is None:
        return f"{view.node.op_type} whose axes do not line up"
    x, y = view.static(("in", 0)), view.static(("out", 0))
    fix = view.node.op_type == "Reshape"
    out: list[AxisClass] = []
    for run_i, run_o in segs:
        head_i, head_o = run_i[0], run_o[0]
        if len(run_i) > 1 and len(run_o) > 1:
            reason = f"{view.node.op_type} regroups these axes"
            out += blocked_classes(view, [("in", 0)], set(run_i), reason)
            out += blocked_classes(view, [("out", 0)], set(run_o), reason)
            continue
        if len(run_i) == 1 and len(run_o) == 1:
            if x[head_i] is not None:
                problem = _shape_entry_problem(view, head_o, head_i == head_o)
                pair = [Member(("in", 0), head_i), Member(("out", 0), head_o)]
                out.append(AxisClass(f"axis{head_i}", x[head_i], pair,
                                     blocked=problem, fixup=fix))
            continue
        if len(run_o) > 1:  # one input axis split into several: the outer output axis holds whole blocks
            size, outer = x[head_i], y[head_o]
            if size is None or outer is None:
                continue
            ids = np.arange(size) // (size // outer)
            problem = _shape_entry_problem(view, head_o, False)
            out.append(AxisClass(f"split{head_i}", outer, [Member(("in", 0), head_i, ids), Member(("out", 0), head_o)],
                                 blocked=problem, fixup=fix))
            out += blocked_classes(view, [("out", 0)], set(run_o[1:]),
                                   f"{view.node.op_type} splits the channel axis; only its outer part can be pruned")
            continue
        size, merged = x[head_i], y[head_o]  # several input axes merged: an outer channel becomes a block
        if size is None or merged is None:
            continue
        ids = np.arange(merged) // (merged // size)
        problem = _shape_entry_problem(view, head_o, False)
        out.append(AxisClass(f"merge{head_i}", size, [Member(("in", 0), head_i), Member(("out", 0), head_o, ids)],
                             blocked=problem, fixup=fix))
        out += blocked_classes(view, [("in", 0)], set(run_i[1:]),
                               f"{view.node.op_type} merges this axis into an outer one")
    return out


@rule("Gather")
def gather(view: NodeView) -> list[AxisClass] | str:
    data, idx = view.static(("in", 0)), view.static(("in", 1))
    if data is None or idx is None:
        return "Gather with unknown shapes"
    axis = int(view.attr("axis", 0)) % len(data)
    out = []
    for a, size in enumerate(data):
        if size is None or a == axis:
            continue
        out.append(AxisClass(f"data{a}", size, [Member(("in", 0), a),
                                                Member(("out", 0), a if a < axis else a - 1 + len(idx))]))
    for t, size in enumerate(idx):
        if size is not None:
            out.append(AxisClass(f"idx{t}", size, [Member(("in", 1), t), Member(("out", 0), axis + t)]))
    return out + blocked_classes(view, [("in", 0)], {axis}, "Gather indexes along this axis")


@rule("Pad")
def pad(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return "Pad with unknown shape"
    pads = view.attr("pads") if view.n_in < 2 else view.const(("in", 1))
    if pads is None:
        return "Pad with pads computed at runtime"
    pads = np.asarray(pads).reshape(-1).tolist()
    axes = list(range(len(x)))
    if view.n_in > 3 and view.value(("in", 3)) is not None:
        given = view.const(("in", 3))
        if given is None:
            return "Pad with axes computed at runtime"
        axes = [int(a) % len(x) for a in given.reshape(-1)]
    padded = {a for k, a in enumerate(axes) if pads[k] or pads[k + len(axes)]}
    return [*identity_classes(view, [("in", 0), ("out", 0)], skip=padded),
            *blocked_classes(view, [("in", 0)], padded, "Pad pads this axis")]


_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")


@rule(*_REDUCE)
def reduce(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return f"{view.node.op_type} with unknown shape"
    if view.node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(view.attr("axis", 0))]
    elif view.attr("axes") is not None:
        axes = list(view.attr("axes"))
    elif view.n_in > 1 and view.value(("in", 1)) is not None:
        const = view.const(("in", 1))
        if const is None:
            return f"{view.node.op_type} with axes computed at runtime"
        axes = const.reshape(-1).tolist()
    else:
        axes = [] if int(view.attr("noop_with_empty_axes", 0)) else list(range(len(x)))
    reduced = {int(a) % len(x) for a in axes}
    keep = int(view.attr("keepdims", 1))
    out, j = [], 0
    for a, size in enumerate(x):
        if a in reduced:
            j += keep
            continue
        if size is not None:
            out.append(AxisClass(f"axis{a}", size, [Member(("in", 0), a), Member(("out", 0), j)]))
        j += 1
    return out + blocked_classes(view, [("in", 0)], reduced, f"{view.node.op_type} reduces over this axis")


@rule("Shape", "Size")
def shape_of(view: NodeView) -> list[AxisClass] | str:
    """The shape adapts at runtime, so pruning is fine unless the channel count itself is read."""
    x = view.static(("in", 0))
    if x is None:
        return f"{view.node.op_type} with unknown input shape"
    rank = len(x)
    if view.node.op_type == "Size":
        read = set(range(rank))
    else:
        start = int(view.attr("start", 0)) % (rank + 1) if view.attr("start") is not None else 0
        end = view.attr("end")
        end = rank if end is None else (end if end >= 0 else end + rank)
        read = set()
        for user in view.node.outputs[0].users():
            idx = user.inputs[1].const if user.op_type == "Gather" and len(user.inputs) > 1 else None
            if idx is None:
                read = set(range(start, min(end, rank)))
                break
            read.update(start + (int(i) % max(end - start, 1)) for i in idx.numpy().reshape(-1))
    reason = f"{view.node.op_type} reads this dim at runtime"
    free = [AxisClass(f"free{a}", s, [Member(("in", 0), a)])
            for a, s in enumerate(x) if s is not None and a not in read]
    return free + blocked_classes(view, [("in", 0)], read, reason)


@rule("Resize", "Upsample")
def resize(view: NodeView) -> list[AxisClass] | str:
    x, y = view.pairs(("in", 0)), view.pairs(("out", 0))
    if x is None or y is None:
        return f"{view.node.op_type} with unknown shapes"
    sizes = view.value(("in", 3)) if view.n_in > 3 else None
    same = {a for a, (p, q) in enumerate(zip(x, y, strict=True)) if p == q}
    if sizes is not None:
        same = set()
    return [*identity_classes(view, [("in", 0), ("out", 0)], skip=set(range(len(x))) - same),
            *blocked_classes(view, [("in", 0)], set(range(len(x))) - same, f"{view.node.op_type} rescales this axis")]

