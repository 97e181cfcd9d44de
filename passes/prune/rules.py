"""How each ONNX op ties the channel axes of its inputs and outputs together.

A rule looks at one node and returns its *axis classes*: sets of (port, axis)
whose elements must be removed together. Each member maps its elements to the
class's index space (``ids``), which is how one rule states a plain identity
(a Relu), an offset (Concat), a block (a channel that Flatten turns into H*W
features, a head that Reshape splits into head_dim features) or a wrap-around
(the k-th channel of every group of a grouped conv). The analysis in
``groups.py`` turns the classes into element-level links, so concat offsets,
blocks and heads need no special cases there.

A rule that does not understand a node returns a reason string, and a class
that must not be pruned (an axis a LayerNorm normalizes over, a Softmax axis)
carries one in ``blocked``: the report names the node and the reason. Ops with
no rule block every channel that reaches them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir import Node, Value

from .probe import ShapeTable

Port = tuple[str, int]  # ("in", input index) or ("out", output index)

# Roles a member can play; importance and reconstruction look them up.
W_OUT, W_IN, BIAS, BN_SCALE, NORM_PARAM, X_IN, Y_OUT = "w_out", "w_in", "bias", "bn_scale", "norm", "x_in", "y_out"


@dataclass
class Member:
    """One (port, axis) of a class; ``ids[e]`` is the class element that element ``e`` belongs to
    (None: identity; -1: the element is not tied to this class, e.g. outside a Slice)."""

    port: Port
    axis: int
    ids: np.ndarray | None = None
    role: str = ""


@dataclass
class AxisClass:
    name: str
    size: int
    members: list[Member]
    blocked: str | None = None
    fixup: bool = False  # the node's attributes or shape inputs depend on this axis' size


@dataclass
class NodeView:
    """A node with the probed shapes of its ports and its constant inputs."""

    node: Node
    shapes: ShapeTable
    extra: dict = field(default_factory=dict)

    def value(self, port: Port) -> Value | None:
        seq = self.node.inputs if port[0] == "in" else self.node.outputs
        return seq[port[1]] if port[1] < len(seq) else None

    def static(self, port: Port) -> tuple[int | None, ...] | None:
        return self.shapes.static(self.value(port))

    def pairs(self, port: Port):
        return self.shapes.pairs(self.value(port))

    def rank(self, port: Port) -> int | None:
        shape = self.static(port)
        return None if shape is None else len(shape)

    def const(self, port: Port) -> np.ndarray | None:
        value = self.value(port)
        return None if value is None or value.const is None else value.const.numpy()

    def attr(self, name: str, default=None):
        return self.node.attr(name, default)

    @property
    def n_in(self) -> int:
        return len(self.node.inputs)

    @property
    def n_out(self) -> int:
        return len(self.node.outputs)


Rule = Callable[[NodeView], "list[AxisClass] | str"]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return wrap


def classes_for(view: NodeView) -> list[AxisClass] | str:
    """The node's axis classes, or why the analysis cannot see through it."""
    node = view.node
    if node.domain not in ("", "ai.onnx"):
        return f"custom op {node.qualified_op} is not understood by the channel analysis"
    if node.subgraphs():
        return f"{node.op_type} has subgraphs; channels are not traced through control flow"
    fn = RULES.get(node.op_type)
    if fn is None:
        return f"op {node.op_type} is not understood by the channel analysis"
    return fn(view)


def identity_classes(view: NodeView, ports: list[Port], skip: set[int] = frozenset(),
                     name: str = "axis") -> list[AxisClass]:
    """One class per static axis shared by same-rank ``ports`` (axes in ``skip`` left out)."""
    shapes = [view.static(p) for p in ports]
    present = [(p, s) for p, s in zip(ports, shapes, strict=True) if s is not None]
    if not present:
        return []
    rank = len(present[0][1])
    out = []
    for axis in range(rank):
        if axis in skip:
            continue
        members = [Member(p, axis) for p, s in present if len(s) == rank and s[axis] is not None]
        if members:
            out.append(AxisClass(f"{name}{axis}", present[0][1][axis], members))
    return out


def blocked_classes(view: NodeView, ports: list[Port], axes: set[int], reason: str) -> list[AxisClass]:
    """Classes for axes that must not be pruned, so a channel arriving there is blocked with ``reason``."""
    out = []
    for port in ports:
        shape = view.static(port)
        for axis in axes:
            if shape is not None and 0 <= axis < len(shape) and shape[axis] is not None:
                out.append(AxisClass(f"blocked{port}{axis}", shape[axis], [Member(port, axis)], blocked=reason))
    return out


# -- weighted layers -------------------------------------------------------------------------
@rule("Conv")
def conv(view: NodeView) -> list[AxisClass] | str:
    w, x = view.static(("in", 1)), view.static(("in", 0))
    if w is None or x is None or len(x) < 3 or w[0] is None or w[1] is None or x[1] is None:
        return "Conv with unknown weight or input shape"
    group, cin, cout, cg = int(view.attr("group", 1)), x[1], w[0], w[1]
    og = cout // group
    bias = [Member(("in", 2), 0, role=BIAS)] if view.n_in > 2 and view.value(("in", 2)) is not None else []
    batch = identity_classes(view, [("in", 0), ("out", 0)], skip=set(range(1, len(x))))
    if group == 1:
        out = AxisClass("out", cout, [Member(("out", 0), 1, role=Y_OUT), Member(("in", 1), 0, role=W_OUT), *bias])
        inp = AxisClass("in", cin, [Member(("in", 0), 1, role=X_IN), Member(("in", 1), 1, role=W_IN)])
        return [out, inp, *batch]
    if cg == 1 and group == cin:  # depthwise (channel multiplier og): input c feeds outputs c*og .. c*og+og-1
        ids = np.arange(cout) // og
        members = [Member(("in", 0), 1), Member(("out", 0), 1, ids, role=Y_OUT), Member(("in", 1), 0, ids, role=W_OUT)]
        members += [Member(b.port, 0, ids, role=BIAS) for b in bias]
        return [AxisClass("depthwise", cin, members, fixup=True), *batch]
    # grouped: the k-th channel of every group goes together, so the groups stay equal in size
    out_ids = np.arange(cout) % og
    out = AxisClass("out", og, [Member(("out", 0), 1, out_ids, role=Y_OUT), Member(("in", 1), 0, out_ids, role=W_OUT),
                                *[Member(b.port, 0, out_ids, role=BIAS) for b in bias]])
    inp = AxisClass("in", cg, [Member(("in", 0), 1, np.arange(cin) % cg), Member(("in", 1), 1, role=W_IN)])
    return [out, inp, *batch]


@rule("ConvTranspose")
def conv_transpose(view: NodeView) -> list[AxisClass] | str:
    w, x = view.static(("in", 1)), view.static(("in", 0))
    if w is None or x is None or w[0] is None or w[1] is None:
        return "ConvTranspose with unknown weight shape"
    group = int(view.attr("group", 1))
    bias = [Member(("in", 2), 0, role=BIAS)] if view.n_in > 2 and view.value(("in", 2)) is not None else []
    if view.attr("output_shape") is not None and group != 1:
        return "grouped ConvTranspose with output_shape"
    if group == 1:
        return [AxisClass("out", w[1], [Member(("out", 0), 1, role=Y_OUT), Member(("in", 1), 1, role=W_OUT), *bias]),
                AxisClass("in", w[0], [Member(("in", 0), 1, role=X_IN), Member(("in", 1), 0, role=W_IN)])]
    if w[1] == 1 and group == w[0]:
        return [AxisClass("depthwise", w[0], [Member(("in", 0), 1), Member(("out", 0), 1, role=Y_OUT),
                                              Member(("in", 1), 0, role=W_OUT), *bias], fixup=True)]
    return "grouped (non-depthwise) ConvTranspose"


@rule("Gemm")
def gemm(view: NodeView) -> list[AxisClass] | str:
    a, b = view.static(("in", 0)), view.static(("in", 1))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return "Gemm with unknown operand shapes"
    ta, tb = int(view.attr("transA", 0)), int(view.attr("transB", 0))
    k, n = (b[1], b[0]) if tb else (b[0], b[1])
    members_n = [Member(("out", 0), 1, role=Y_OUT), Member(("in", 1), 0 if tb else 1, role=W_OUT)]
    c = view.static(("in", 2)) if view.n_in > 2 and view.value(("in", 2)) is not None else None
    if c is not None and len(c) >= 1 and c[-1] == n and n != 1:
        members_n.append(Member(("in", 2), len(c) - 1, role=BIAS))
    out = [AxisClass("out", n, members_n),
           AxisClass("in", k, [Member(("in", 0), 0 if ta else 1, role=X_IN),
                               Member(("in", 1), 1 if tb else 0, role=W_IN)])]
    m = a[1] if ta else a[0]
    if m is not None:
        out.append(AxisClass("rows", m, [Member(("in", 0), 1 if ta else 0), Member(("out", 0), 0)]))
    return out


@rule("MatMul")
def matmul(view: NodeView) -> list[AxisClass] | str:
    a, b, y = view.static(("in", 0)), view.static(("in", 1)), view.static(("out", 0))
    if a is None or b is None or y is None:
        return "MatMul with unknown operand shapes"
    if len(a) < 2 or len(b) < 2:
        return "MatMul with a 1-D operand"
    ra, rb, ry = len(a), len(b), len(y)
    weight = view.value(("in", 1)) is not None and view.value(("in", 1)).const is not None and rb == 2
    out = [AxisClass("k", a[-1], [Member(("in", 0), ra - 1, role=X_IN if weight else ""),
                                  Member(("in", 1), rb - 2, role=W_IN if weight else "")]),
           AxisClass("n", b[-1], [Member(("in", 1), rb - 1, role=W_OUT if weight else ""),
                                  Member(("out", 0), ry - 1, role=Y_OUT if weight else "")])]
    if a[-2] is not None:
        out.append(AxisClass("m", a[-2], [Member(("in", 0), ra - 2), Member(("out", 0), ry - 2)]))
    for axis in range(ry - 2):  # broadcast batch axes, aligned from the right
        size = y[axis]
        if size is None:
            continue
        members = [Member(("out", 0), axis)]
        for port, shape in ((("in", 0), a), (("in", 1), b)):
            own = axis - (ry - len(shape))
            if own >= 0 and shape[own] == size and size != 1:
                members.append(Member(port, own))
        out.append(AxisClass(f"batch{axis}", size, members))
    return out


# -- normalizations ----------------------------------------------------------------------------
@rule("BatchNormalization", "InstanceNormalization")
def batch_norm(view: NodeView) -> list[AxisClass] | str:
    if view.node.op_type == "BatchNormalization" and int(view.attr("training_mode", 0)):
        return "BatchNormalization in training mode"
    x = view.static(("in", 0))
    if x is None or len(x) < 2 or x[1] is None:
        return f"{view.node.op_type} with unknown input shape"
    params = [Member(("in", i), 0, role=BN_SCALE if i == 1 else NORM_PARAM)
              for i in range(1, view.n_in) if view.value(("in", i)) is not None]
    chan = AxisClass("channel", x[1], [Member(("in", 0), 1), Member(("out", 0), 1), *params])
    return [chan, *identity_classes(view, [("in", 0), ("out", 0)], skip={1})]


@rule("GroupNormalization")
def group_norm(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    groups = int(view.attr("num_groups", 0))
    if x is None or x[1] is None or not groups or x[1] % groups:
        return "GroupNormalization with unknown channel count"
    per = x[1] // groups
    ids = np.arange(x[1]) // per
    members = [Member(("in", 0), 1, ids), Member(("out", 0), 1, ids)]
    for i in (1, 2):
        shape = view.static(("in", i))
        if shape is not None and len(shape) == 1:
            role = BN_SCALE if i == 1 else NORM_PARAM
            members.append(Member(("in", i), 0, ids if shape[0] == x[1] else None, role=role))
    return [AxisClass("groups", groups, members, fixup=True),
            *identity_classes(view, [("in", 0), ("out", 0)], skip={1})]


@rule("LayerNormalization")
def layer_norm(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return "LayerNormalization with unknown input shape"
    axis = int(view.attr("axis", -1)) % len(x)
    ports = [("in", 0), ("out", 0)] + [("out", i) for i in range(1, view.n_out)]
    normalized = set(range(axis, len(x)))
    reason = "LayerNormalization normalizes over this axis (its statistics would change)"
    return [*identity_classes(view, ports, skip=normalized),
            *blocked_classes(view, [("in", 0), ("out", 0)], normalized, reason)]


@rule("LpNormalization", "LRN", "MeanVarianceNormalization")
def cross_channel_norm(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return f"{view.node.op_type} with unknown input shape"
    if view.node.op_type == "LpNormalization":
        axes = {int(view.attr("axis", -1)) % len(x)}
    elif view.node.op_type == "LRN":
        axes = {1}
    else:
        axes = {a % len(x) for a in view.attr("axes", [0, 2, 3])}
    reason = f"{view.node.op_type} mixes values along this axis"
    return [*identity_classes(view, [("in", 0), ("out", 0)], skip=axes),
            *blocked_classes(view, [("in", 0), ("out", 0)], axes, reason)]


# -- elementwise -------------------------------------------------------------------------------
_BROADCAST = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal", "Greater",
              "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift", "BitwiseAnd",
              "BitwiseOr", "BitwiseXor")
_UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu",
          "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal",
          "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Not", "IsNaN", "IsInf", "Cast", "CastLike",
          "Identity", "Dropout", "Clip", "Swish", "BitwiseNot", "Shrink", "Atan", "Asin", "Acos", "Sinh", "Cosh",
          "Asinh", "Acosh", "Atanh", "QuickGelu")


@rule(*_BROADCAST)
def broadcast(view: NodeView) -> list[AxisClass] | str:
    """Numpy broadcasting: an input whose dim is 1 on an axis is not tied there (a per-channel
    constant of shape (C, 1, 1) is, and gets sliced with the channels)."""
    y = view.static(("out", 0))
    if y is None:
        return f"{view.node.op_type} with unknown output shape"
    shapes = [view.static(("in", i)) if view.value(("in", i)) is not None else () for i in range(view.n_in)]
    if any(s is None for s in shapes):
        return f"{view.node.op_type} with an operand of unknown shape (cannot tell broadcasting)"
    out = []
    for axis, size in enumerate(y):
        if size is None:
            continue
        members = [Member(("out", 0), axis)]
        for i, shape in enumerate(shapes):
            own = axis - (len(y) - len(shape))
            if own >= 0 and shape[own] == size and size != 1:
                members.append(Member(("in", i), own))
        out.append(AxisClass(f"axis{axis}", size, members))
    return out


@rule(*_UNARY)
def unary(view: NodeView) -> list[AxisClass] | str:
    ports = [("in", 0)] + [("out", i) for i in range(view.n_out) if view.value(("out", i)) is not None]
    return identity_classes(view, ports)


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(view: NodeView) -> list[AxisClass] | str:
    if view.n_out > 1 and view.value(("out", 1)) is not None and view.value(("out", 1)).has_uses():
        return "MaxPool indices encode channel positions"
    x = view.static(("in", 0))
    if x is None:
        return f"{view.node.op_type} with unknown input shape"
    return identity_classes(view, [("in", 0), ("out", 0)], skip=set(range(2, len(x))))


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(view: NodeView) -> list[AxisClass] | str:
    x = view.static(("in", 0))
    if x is None:
        return f"{view.node.op_type} with unknown input shape"
    axis = int(view.attr("axis", -1)) % len(x)
    axes = {axis}  # opset >= 13; older opsets coerce to 2-D at ``axis``, which covers every later axis
    if view.extra.get("opset", 13) < 13:
        axes = set(range(axis, len(x)))
    reason = f"{view.node.op_type} normalizes over this axis"
    return [*identity_classes(view, [("in", 0), ("out", 0)], skip=axes),
            *blocked_classes(view, [("in", 0), ("out", 0)], axes, reason)]
