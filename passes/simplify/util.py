"""Helpers shared by the simplification passes: scope facts, safe replacement, constants.

Every simplification ends the same way: a node's output is replaced by another
value and the node goes. Two things make that subtle, and both live here so
each pass gets them right once:

* graph outputs keep their names. When the value to remove is a graph output,
  its replacement may take over the name only if it is a plain output of a node
  of the *same* graph (not a graph input, an initializer, an outer-scope value,
  or another graph output); otherwise the node stays.
* membership tests must be O(1). ``Value.is_graph_output()`` scans the output
  list, which is quadratic over a sweep of a graph with many outputs, so a
  :class:`Scope` computes each graph's output set once and keeps it current.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx

from graphopt.ir import ArrayTensor, Graph, Model, Node, Tensor, TensorType, Value

OPSET_DOMAINS = ("", "ai.onnx")
"""The default ONNX domain: the only one whose ops the simplifications rewrite."""

KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
"""Domains whose ops are pure functions of their inputs (random ops aside), for CSE."""


class Scope:
    """Facts about a model that one sweep of a pass looks up per node, computed once.

    ``outputs(graph)`` is the set of ids of the graph's outputs; :func:`replace_output`
    keeps it current when it renames. ``input_ids`` covers every graph's inputs, so
    an initializer that is also an input (overridable at run time, hence not a
    constant) is recognised in O(1) from inside any subgraph.
    """

    def __init__(self, model: Model | None = None) -> None:
        self.model = model
        self._outputs: dict[int, set[int]] = {}
        self.graphs: list[Graph] = list(model.graphs()) if model is not None else []  # walked once per sweep
        self.input_ids: set[int] = {id(v) for g in self.graphs for v in g.inputs}
        functions = model.functions if model is not None else []
        self.function_keys = {f.key for f in functions}
        self.function_roots = {id(f.graph): f for f in functions}
        self._known: dict[tuple[str, str], bool] = {}

    def outputs(self, graph: Graph) -> set[int]:
        found = self._outputs.get(id(graph))
        if found is None:
            found = self._outputs[id(graph)] = {id(v) for v in graph.outputs}
        return found

    def is_output(self, value: Value) -> bool:
        return value.graph is not None and id(value) in self.outputs(value.graph)

    def is_dead(self, node: Node) -> bool:
        """No output of ``node`` is read or is a graph output."""
        return not any(out.has_uses() or self.is_output(out) for out in node.outputs)

    def is_opset_op(self, node: Node) -> bool:
        """An op of the default ONNX domain (not a model-local function that shadows one)."""
        return node.domain in OPSET_DOMAINS and (node.domain, node.op_type, node.overload) not in self.function_keys

    def is_known_op(self, node: Node) -> bool:
        """A standard op (default or ML domain) that onnx knows; custom ops and functions are not."""
        if node.domain not in KNOWN_DOMAINS or (node.domain, node.op_type, node.overload) in self.function_keys:
            return False
        key = (node.domain, node.op_type)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = onnx.defs.has(node.op_type, "" if node.domain == "ai.onnx" else node.domain)
        return known

    def in_function(self, graph: Graph) -> bool:
        """Function bodies cannot hold initializers: constants there must be Constant nodes."""
        return id(graph.root) in self.function_roots

    def opset(self, graph: Graph) -> int:
        function = self.function_roots.get(id(graph.root))
        default = (self.model.opset() if self.model is not None else None) or 21
        if function is not None:
            return function.opset_imports.get("", function.opset_imports.get("ai.onnx", default))
        return default


# -- replacing values ----------------------------------------------------------------
def rename_blocker(value: Value, graph: Graph, scope: Scope) -> str | None:
    """Why ``value`` cannot take over the name of one of ``graph``'s outputs (None: it can)."""
    producer = value.producer
    if id(value) in scope.outputs(graph):
        return f"{value.name!r} is itself a graph output"
    if producer is None or producer.graph is not graph:
        if value.graph is not graph:
            return f"{value.name!r} is defined outside this graph"
        if value.const is not None:
            return f"{value.name!r} is an initializer"
        if graph.parent is None:
            return f"{value.name!r} is a graph input"
        if graph.parent.op_type == "Scan":  # onnxruntime's Scan computes zeros and wrong scan outputs then
            return f"{value.name!r} is an input of this Scan body"
        return None  # a Loop/If body's input: bodies bind inputs and outputs by position, not by name
    return None


def replace_output(old: Value, new: Value, graph: Graph, scope: Scope) -> str | None:
    """Point every use of ``old`` at ``new``; returns why not (nothing changed) or None when done.

    If ``old`` is a graph output, ``new`` takes over its name, type and doc string
    (see :func:`rename_blocker` for when that is legal). The caller erases ``old``'s
    producer right after, so the name is briefly held twice.
    """
    outputs = scope.outputs(graph)
    if id(old) not in outputs:
        old.replace_all_uses_with(new)
        return None
    why = rename_blocker(new, graph, scope)
    if why is not None:
        return f"{old.name!r} is a graph output and {why}"
    old.replace_all_uses_with(new, include_graph_outputs=True)
    outputs.discard(id(old))
    outputs.add(id(new))
    new.name, new.type = old.name, old.type or new.type
    new.doc_string = new.doc_string or old.doc_string
    return None


def erase_dead(node: Node, scope: Scope) -> bool:
    """Erase ``node`` if nothing reads its outputs; True if it went.

    Deadness is checked against the scope's output sets, so the node is erased with
    ``keep_outputs=True``: that skips ``Graph.erase``'s per-output scan of the graph
    outputs (the outputs are unused, so detaching them changes nothing else).
    """
    graph = node.graph
    if graph is None or not scope.is_dead(node):
        return False
    graph.erase(node, keep_outputs=True)
    return True


def erase_dead_producers(values: Iterable[Value | None], graph: Graph, scope: Scope) -> int:
    """Erase the now-dead standard-op producers of ``values`` in ``graph`` (and orphaned initializers).

    Only producers that come before the node being rewritten are reached, which a
    forward sweep over the graph has already visited, so the sweep stays valid.
    Nodes holding subgraphs are left to ``eliminate-dead-nodes``.
    """
    erased, stack = 0, [v for v in values if v is not None]
    while stack:
        value = stack.pop()
        producer = value.producer
        if producer is None and graph.initializers.get(value.name) is value and not value.has_uses():
            if id(value) not in scope.input_ids and not scope.is_output(value):
                graph.remove_initializer(value.name)  # orphaned by the rewrite (a shape or axes constant)
            continue
        if producer is None or producer.graph is not graph or producer.subgraphs() or not scope.is_known_op(producer):
            continue
        inputs = list(producer.inputs)
        if erase_dead(producer, scope):
            erased += 1
            stack.extend(v for v in inputs if v is not None)
    return erased


def bypass(node: Node, source: Value, graph: Graph, scope: Scope | None = None) -> bool:
    """Make ``node``'s only output an alias of ``source`` and erase the node; False if not allowed.

    If that output is a graph output, ``source`` takes over its name, which is
    possible only when ``source`` is a plain node output of this same graph.
    """
    scope = scope or Scope()  # one-off use (cleanup passes): output sets computed on demand
    if replace_output(node.outputs[0], source, graph, scope) is not None:
        return False
    graph.erase(node)
    return True


# -- constants -----------------------------------------------------------------------
def constant_tensor(value: Value | None, scope: Scope) -> Tensor | None:
    """The tensor ``value`` always holds: a (non-input) initializer or a Constant node's output."""
    if value is None:
        return None
    if value.const is not None:
        return None if id(value) in scope.input_ids else value.const
    node = value.producer
    if node is None or node.op_type != "Constant" or not scope.is_opset_op(node) or len(node.attrs) != 1:
        return None
    from ..cleanup import _constant_tensor  # late: cleanup imports this module

    return _constant_tensor(node)


def constant_array(value: Value | None, scope: Scope, max_elements: int = 1 << 16) -> np.ndarray | None:
    """The data of a constant ``value`` if it has at most ``max_elements`` (big weights stay unread)."""
    tensor = constant_tensor(value, scope)
    if tensor is None or math.prod(tensor.shape) > max_elements:  # (Tensor.size goes through np.prod: slow)
        return None
    return tensor.numpy()


def constant_ints(value: Value | None, scope: Scope) -> list[int] | None:
    """A small integer constant as a flat list (shapes, axes, perms, pads)."""
    array = constant_array(value, scope, max_elements=1024)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def add_constant(graph: Graph, array: np.ndarray, anchor: Node, scope: Scope, name: str) -> Value:
    """A new constant named ``name`` (unused) for ``anchor``: an initializer, or a Constant node in a function."""
    if not scope.in_function(graph):
        return graph.add_initializer(ArrayTensor(np.asarray(array), name))
    node = Node("Constant", attrs={"value": ArrayTensor(np.asarray(array), name)}, outputs=[name],
                name=graph.fresh_name(f"{name}_node"))
    graph.insert_before(anchor, node)
    out = node.outputs[0]
    out.type = TensorType(node.attrs["value"].value.elem_type, tuple(np.shape(array)))
    return out



# -- symbolic shapes through view ops ------------------------------------------------
class Sym:
    """A dimension known only symbolically; equal only to itself (named dims are plain ``str``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"?{id(self) % 10000}"


SymDim = int | str | Sym


def symbolic_shape(value: Value) -> list[SymDim] | None:
    """``value``'s shape with unknown dims as fresh :class:`Sym` (None if the rank is unknown)."""
    shape = value.shape
    if shape is None:
        return None
    return [d if isinstance(d, int | str) and d != "" else Sym() for d in shape]


def same_dim(a: SymDim, b: SymDim) -> bool:
    """Provably equal: equal ints, equal dim names (ONNX: same name, same size), or one Sym."""
    if isinstance(a, Sym) or isinstance(b, Sym):
        return a is b
    return type(a) is type(b) and a == b


def _product(dims: list[SymDim]) -> SymDim:
    static = 1
    symbols = []
    for d in dims:
        if isinstance(d, int):
            static *= d
        else:
            symbols.append(d)
    if not symbols:
        return static
    return symbols[0] if len(symbols) == 1 and static == 1 else Sym()


def normalize_axes(axes: list[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative (None when a negative axis meets an unknown rank, or out of range)."""
    if any(a < 0 for a in axes) and rank is None:
        return None
    out = [a + rank if a < 0 else a for a in axes] if rank is not None else list(axes)
    if rank is not None and any(not 0 <= a < rank for a in out):
        return None
    return out


def view_shape(op_type: str, shape: list[SymDim], *, axes: list[int] | None = None, axis: int = 1,
               target: list[int] | None = None, allowzero: int = 0) -> list[SymDim] | None:
    """The output shape of Squeeze/Unsqueeze/Flatten/Reshape on ``shape`` (None if not derivable)."""
    rank = len(shape)
    if op_type == "Unsqueeze":
        norm = normalize_axes(axes or [], rank + len(axes or []))
        if not norm or len(set(norm)) != len(norm):
            return None
        rest = iter(shape)
        return [1 if i in norm else next(rest) for i in range(rank + len(norm))]
    if op_type == "Squeeze":
        if axes is None:
            return [d for d in shape if d != 1] if all(isinstance(d, int) for d in shape) else None
        norm = normalize_axes(axes, rank)
        if norm is None or any(isinstance(shape[a], int) and shape[a] != 1 for a in norm):
            return None
        return [d for i, d in enumerate(shape) if i not in norm]
    if op_type == "Flatten":
        cut = axis + rank if axis < 0 else axis
        return [_product(shape[:cut]), _product(shape[cut:])] if 0 <= cut <= rank else None
    if op_type == "Reshape" and target is not None:
        return _reshape_shape(shape, target, allowzero)
    return None


def _reshape_shape(shape: list[SymDim], target: list[int], allowzero: int) -> list[SymDim] | None:
    if any(t < -1 for t in target):
        return None
    out: list[SymDim] = []
    for i, t in enumerate(target):
        if t == 0 and not allowzero:
            if i >= len(shape):
                return None
            out.append(shape[i])
        else:
            out.append(t)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        out[out.index(-1)] = _inferred_dim(shape, [d for d in out if d != -1])
    return out


def _inferred_dim(shape: list[SymDim], others: list[SymDim]) -> SymDim:
    """The -1 of a Reshape: the input's size over the other output dims, cancelling equal symbols."""
    left = [d for d in shape if not isinstance(d, int)]
    static_in = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
    static_out = 1
    for d in others:
        if isinstance(d, int):
            static_out *= d
            continue
        match = next((i for i, s in enumerate(left) if same_dim(s, d)), None)
        if match is None:
            return Sym()
        left.pop(match)
    if static_out == 0 or static_in % static_out:
        return Sym()
    rest = static_in // static_out
    if not left:
        return rest
    return left[0] if len(left) == 1 and rest == 1 else Sym()


def reshape_target(source: list[SymDim], result: list[SymDim]) -> list[int] | None:
    """A Reshape shape input that turns a tensor of shape ``source`` into ``result`` (None if none is safe).

    Static dims are written as they are, a symbolic dim at the same position as in
    ``source`` as 0 (copy), and at most one other dim as -1. The -1 is used only
    beside static non-zero dims: next to a copied dim that is 0 at run time,
    onnxruntime cannot infer it, and a graph that ran would fail.
    """
    target: list[int] = []
    for j, d in enumerate(result):
        if isinstance(d, int):
            if d <= 0:
                return None  # a literal 0 would read as "copy"; zero-size shapes are not worth the risk
            target.append(d)
        elif j < len(source) and same_dim(source[j], d):
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1 or (-1 in target and 0 in target):
        return None
    return target
