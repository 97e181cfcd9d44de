"""fold-shapes: fold shape computations, keeping dynamic dims dynamic.

Exporters compute shapes at run time: ``Shape(x) -> Gather -> Unsqueeze ->
Concat -> Reshape``. Where a dim is static its element becomes a constant;
where the whole tensor is known it becomes an initializer. Where a dim is
dynamic, a Reshape or Expand target often does not need it: Reshape's 0
copies the input's dim at the same position (when ``allowzero`` is 0) and -1
infers one dim; Expand's 1 keeps the input's dim. Rewriting the target that
way makes the whole Shape/Gather/Concat chain dead, and the model still runs
at every batch and sequence length, because no dynamic dim became a number.

Element values come from :mod:`.partial`; dims are compared through value
types, so the pass first refines them (:func:`graphopt.shapes.ensure_shapes`).

One rewrite is off by default (``fold-shapes.infer_with_copy``): a target that
needs both a copied dim (0) and an inferred one (-1). onnxruntime refuses -1
when a copied dim is 0 at run time (an empty batch), where the original
target would have worked.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx

from graphopt.ir import ArrayTensor, Graph, Model, Node, TensorType, Value
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass
from graphopt.shapes import SYMBOLIC_MAX_NODES, ensure_shapes

from .evaluate import ConstantScope, has_subgraphs
from .partial import INT_TYPES, MAX_ELEMENTS, RULES, Partial, Sym, dim_symbol, from_array, objects, propagate

log = logging.getLogger(__name__)


@register_pass
class FoldShapes(Pass):
    name = "fold-shapes"
    description = "Fold Shape/Gather/Slice/Concat chains; rewrite Reshape/Expand targets so dynamic dims stay dynamic"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        graphs = list(model.graph.walk_graphs())
        if not any(n.op_type in ("Shape", "Size") for g in graphs for n in g):
            return PassResult(0)
        if ctx.option(self.name, "infer", True):
            ensure_shapes(model, symbolic=bool(ctx.option(self.name, "symbolic", True)),
                          symbolic_max_nodes=int(ctx.option(self.name, "symbolic_max_nodes", SYMBOLIC_MAX_NODES)))
        folder = ShapeFolder(model, graphs, infer_with_copy=bool(ctx.option(self.name, "infer_with_copy", False)))
        return PassResult(folder.run(graphs))


class ShapeFolder:
    """One forward sweep: propagate partial values, rewrite where they allow it, then drop dead chains."""

    def __init__(self, model: Model, graphs: list[Graph], *, infer_with_copy: bool = False) -> None:
        self.model = model
        self.scope = ConstantScope(model, graphs)
        self.opset = model.opset("") or 1
        self.infer_with_copy = infer_with_copy
        self.values: dict[int, Partial] = {}
        self.maybe_dead: list[Node] = []
        self.later: list[Node] = []
        self._constants: dict[tuple, Value] = {}

    def run(self, graphs: list[Graph]) -> int:
        changes = 0
        for graph in graphs:
            for node in graph:  # (erasing the node just yielded is safe)
                changes += self._visit(node)
        changes += self._drop_dead()
        # Shape chains the rewrites did not make dead: shorten them (once, not for every node on the way).
        for node in self.later:
            if node.graph is not None:
                changes += self._shorten(node)
        return changes + self._drop_dead()

    def partial(self, value: Value | None) -> Partial | None:
        if value is None:
            return None
        known = self.values.get(id(value))
        if known is None:
            tensor = self.scope.constant_tensor(value)
            if tensor is not None and tensor.elem_type in INT_TYPES and math.prod(tensor.shape) <= MAX_ELEMENTS:
                known = from_array(np.asarray(tensor.numpy()), tensor.elem_type)
                self.values[id(value)] = known
        return known

    def _visit(self, node: Node) -> int:
        op = node.op_type
        if op not in RULES or node.domain not in ("", "ai.onnx") or not node.outputs:
            return 0
        out_type = node.outputs[0].type
        if isinstance(out_type, TensorType) and out_type.elem_type and out_type.elem_type not in INT_TYPES:
            if op in ("Reshape", "Expand") and len(node.inputs) > 1:  # float data, integer target
                return self._rewrite_target(node, self.partial(node.inputs[1]))
            return 0  # (most nodes of a network: nothing to track)
        inputs = [self.partial(v) for v in node.inputs]
        outputs = propagate(node, inputs, self.opset)
        for out, p in zip(node.outputs, outputs, strict=True):
            if p is not None:
                self.values[id(out)] = p
        if all(p is not None and p.known for p in outputs):
            return self._materialize(node, outputs)
        changed = 0
        if op in ("Reshape", "Expand") and len(node.inputs) > 1:
            changed = self._rewrite_target(node, inputs[1])
        out = outputs[0] if len(outputs) == 1 else None
        if op == "Concat" and any(p is not None and p.known for p in inputs) or out is not None and all(
                e is not None for e in out.array.flat):
            self.later.append(node)  # rewritten after the sweep, if the rewrites above leave it alive
        return changed

    # -- rewrites ------------------------------------------------------------------------
    def _materialize(self, node: Node, outputs: list[Partial]) -> int:
        """All outputs known: they become initializers under their own names."""
        if any(self.scope.is_output(o) for o in node.outputs) or not self.scope.is_standard(node):
            return 0
        graph = node.graph
        self.maybe_dead.extend(v.producer for v in node.inputs if v is not None and v.producer is not None)
        values = node.outputs
        graph.erase(node, keep_outputs=True)
        for out, p in zip(values, outputs, strict=True):
            if out.has_uses():
                out.const = ArrayTensor(p.numpy(), out.name)
                out.type = TensorType(out.const.elem_type, out.const.shape)
                graph.add_initializer(out)
        return 1

    def _rewrite_target(self, node: Node, target: Partial | None) -> int:
        value = node.inputs[1]
        if target is None or target.known or target.array.ndim != 1 or self.scope.is_initializer(value):
            return 0  # (a known target is a constant already, or will be once its producer is folded)
        solve = self._reshape_target if node.op_type == "Reshape" else self._expand_target
        solved = solve(node, list(target.array.flat))
        if solved is None:
            return 0
        dims, attrs = solved
        new = self._constant(node.graph, np.array(dims, dtype=np.int64), f"{node.outputs[0].name}_shape")
        node.set_input(1, new)
        for key, val in attrs.items():
            node.set_attr(key, val)
        if value.producer is not None:
            self.maybe_dead.append(value.producer)
        return 1

    def _reshape_target(self, node: Node, elems: list) -> tuple[list[int], dict] | None:
        """Reshape's target with dynamic dims replaced by 0 (copy the input's) or one -1."""
        data, allowzero = node.inputs[0], node.attr("allowzero", 0)
        out: list[int | None] = []
        copies = False
        for i, e in enumerate(elems):
            if isinstance(e, int):
                copies |= e == 0 and not allowzero
                out.append(e)
            elif e is not None and dim_symbol(data, i) == e:
                out.append(0)
                copies = True
            else:
                out.append(None)
        unresolved = [i for i, d in enumerate(out) if d is None]
        literal_zero = bool(allowzero) and 0 in elems
        if len(unresolved) > 1 or unresolved and (-1 in elems or literal_zero):
            return None
        if unresolved:
            if copies and not self.infer_with_copy:
                return None
            out[unresolved[0]] = -1
        attrs = {}
        if allowzero and copies:
            if literal_zero:
                return None
            attrs["allowzero"] = 0
        return out, attrs

    def _expand_target(self, node: Node, elems: list) -> tuple[list[int], dict] | None:
        """Expand's target with each dynamic dim that equals the input's aligned dim replaced by 1."""
        data = node.inputs[0]
        if data.shape is None:
            return None
        offset = len(elems) - len(data.shape)
        out = []
        for j, e in enumerate(elems):
            if isinstance(e, int):
                out.append(e)
            elif e is not None and 0 <= j - offset < len(data.shape) and dim_symbol(data, j - offset) == e:
                out.append(1)
            else:
                return None
        return out, {}

    def _shorten(self, node: Node) -> int:
        """A chain whose value is fully described by its elements: alias it to an input with the same
        elements (``Where(false, _, x)``, ``Reshape(x, [-1])`` of a 1-D x), or read it with one
        ``Shape(x, start, end)`` when it is dims of x in order; Concats merge their runs."""
        inputs = [self.partial(v) for v in node.inputs]
        out, p = node.outputs[0], self.values.get(id(node.outputs[0]))
        if p is None or self.scope.is_output(out) or not out.has_uses():
            return 0
        if node.op_type == "Concat":
            return self._merge_concat(node, inputs)
        for value, q in zip(node.inputs, inputs, strict=True):
            if q is not None and q.elem_type == p.elem_type and q.array.shape == p.array.shape and all(
                    a == b for a, b in zip(q.array.flat, p.array.flat, strict=True)):
                out.replace_all_uses_with(value)
                self.maybe_dead.append(node)
                return 1
        run = self._dims_run(p)
        if run is None or node.op_type == "Shape" or self._exclusive_chain(out, None) < 2:
            return 0
        out.replace_all_uses_with(self._shape_of(node, *run))
        self.maybe_dead.append(node)
        return 1

    def _merge_concat(self, node: Node, inputs: list[Partial | None]) -> int:
        """Merge runs of a partly dynamic Concat's inputs: known ones into one constant, dims of one
        value read in order (``Unsqueeze(Gather(Shape(x), i))``...) into one ``Shape(x, start, end)``."""
        axis = node.attr("axis", 0)
        pieces = [(v, p, self._dims_run(p)) for v, p in zip(node.inputs, inputs, strict=True)]
        new_inputs: list[Value] = []
        changed = False
        i = 0
        while i < len(pieces):
            value, p, run = pieces[i]
            j = i + 1
            if p is not None and p.known:
                while j < len(pieces) and pieces[j][1] is not None and pieces[j][1].known:
                    j += 1
                if j - i >= 2 or not self.scope.is_initializer(value):
                    arrays = [q.numpy() for _, q, _ in pieces[i:j]]
                    new_inputs.append(self._constant(node.graph, np.concatenate(arrays, axis=axis),
                                                     f"{node.outputs[0].name}_part"))
                    changed = True
                else:
                    new_inputs.append(value)
            elif run is not None:
                source, start, end = run
                while j < len(pieces) and pieces[j][2] is not None and pieces[j][2][:2] == (source, end):
                    end = pieces[j][2][2]
                    j += 1
                already = j - i == 1 and _reads_dims(value, source, start, end)
                if not already and sum(self._exclusive_chain(v, node) for v, _, _ in pieces[i:j]) >= 2:
                    # one Shape replaces them
                    new_inputs.append(self._shape_of(node, source, start, end))
                    changed = True
                else:
                    new_inputs.append(value)
            else:
                new_inputs.append(value)
            if changed:
                self.maybe_dead.extend(v.producer for v, _, _ in pieces[i:j] if v.producer is not None)
            i = j
        if not changed:
            return 0
        out = node.outputs[0]
        if len(new_inputs) == 1 and not self.scope.is_output(out):
            out.replace_all_uses_with(new_inputs[0])  # a Concat of one input is that input
            self.maybe_dead.append(node)
        else:
            node.set_inputs(new_inputs)
        return 1

    def _dims_run(self, p: Partial | None) -> tuple[Value, int, int] | None:
        """``(x, start, end)`` when ``p`` is dims start..end-1 of one live value x, as Shape(x) gives them."""
        if p is None or p.array.ndim != 1 or not p.array.size or p.elem_type != onnx.TensorProto.INT64:
            return None
        elems = p.array.tolist()
        first = elems[0]
        if not isinstance(first, Sym):
            return None
        source, start = first.value, first.axis
        for k, e in enumerate(elems):
            if not isinstance(e, Sym) or e.value is not source or e.axis != start + k:
                return None
        producer = source.producer
        alive = source.graph is not None if producer is None else producer.graph is not None
        if not alive or source.shape is None:
            return None
        end = start + len(elems)
        if self.opset < 15 and (start, end) != (0, len(source.shape)):
            return None  # Shape's start/end attributes came in opset 15
        return source, start, end

    def _exclusive_chain(self, value: Value, user: Node | None, depth: int = 5) -> int:
        """How many nodes only ``user`` keeps alive through ``value`` (what replacing it would remove);
        ``user=None``: all of ``value``'s uses are being replaced."""
        producer = value.producer
        if depth == 0 or producer is None or has_subgraphs(producer) or len(producer.outputs) != 1:
            return 0
        if user is not None and any(u is not user for u in value.users()) or self.scope.is_output(value):
            return 0
        inputs = dict.fromkeys(v for v in producer.inputs if v is not None)
        return 1 + sum(self._exclusive_chain(v, producer, depth - 1) for v in inputs)

    def _shape_of(self, anchor: Node, source: Value, start: int, end: int) -> Value:
        attrs = {} if (start, end) == (0, len(source.shape)) else {"start": start, "end": end}
        shape = Node("Shape", [source], attrs, outputs=[anchor.graph.fresh_name(f"{source.name}_dims")])
        anchor.graph.insert_before(anchor, shape)
        out = shape.outputs[0]
        out.type = TensorType(onnx.TensorProto.INT64, (end - start,))
        self.values[id(out)] = Partial(onnx.TensorProto.INT64,
                                       objects([dim_symbol(source, a) for a in range(start, end)], (end - start,)))
        return out

    # -- helpers -------------------------------------------------------------------------
    def _constant(self, graph: Graph, array: np.ndarray, hint: str) -> Value:
        """An initializer holding ``array``; identical ones in the same graph are shared."""
        key = (id(graph), array.dtype.str, array.shape, array.tobytes())
        value = self._constants.get(key)
        if value is None or value.graph is not graph:
            value = graph.add_initializer(ArrayTensor(array, graph.fresh_name(hint)))
            self._constants[key] = value
        return value

    def _drop_dead(self) -> int:
        """Erase the chains the rewrites left without users (standard ops only)."""
        removed = 0
        stack = self.maybe_dead
        while stack:
            node = stack.pop()
            if node.graph is None or has_subgraphs(node) or not self.scope.is_standard(node):
                continue
            if any(o.has_uses() or self.scope.is_output(o) for o in node.outputs):
                continue
            stack.extend(v.producer for v in node.inputs if v is not None and v.producer is not None)
            node.graph.erase(node)
            removed += 1
        return removed


def _reads_dims(value: Value, source: Value, start: int, end: int) -> bool:
    """``value`` is already ``Shape(source)`` restricted to dims start..end-1 (so rewriting it changes nothing)."""
    node = value.producer
    if node is None or node.op_type != "Shape" or node.inputs[0] is not source or source.shape is None:
        return False
    rank = len(source.shape)
    lo, hi = node.attr("start", 0), node.attr("end", rank)
    lo, hi = lo + rank if lo < 0 else lo, hi + rank if hi < 0 else hi
    return (max(0, min(lo, rank)), max(0, min(hi, rank))) == (start, end)
