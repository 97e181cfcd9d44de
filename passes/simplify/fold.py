"""fold-constants: evaluate nodes whose inputs are all constants and keep the results as initializers.

Each sweep collects every foldable node of the model (subgraph bodies
included; function bodies are skipped because they cannot hold initializers)
and evaluates them in ONE onnxruntime session (see :mod:`.evaluate`). A folded
node's outputs become initializers under their own names, so value_info and
debugging names survive.

A size guard keeps folding from bloating the file: a node whose outputs are
more than ``max_growth`` times the bytes of its inputs stays (Expand, Tile,
ConstantOfShape, Range and broadcasting ops turn a few bytes into megabytes)
unless the result is tiny (``always_fold_bytes``). Ops that can blow up are
sized before they are evaluated, from their static output type or from
their constant shape inputs, so the guard also bounds the evaluator's memory.

Never folded: random ops, sequence/optional producers, ops outside the standard
domains or calling model-local functions, Quantize/DequantizeLinear (runtimes
fuse QDQ patterns into integer kernels; ``fold_quantize`` to fold them), and
Loops without a small constant trip count. Options (``PassContext`` config
``fold-constants.<name>``): ``max_growth`` (2.0), ``always_fold_bytes`` (1024),
``fold_quantize`` (False), ``fold_subgraphs`` (True).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir import ArrayTensor, Graph, Model, Node, Tensor, TensorType, Value
from graphopt.ir.tensor import numpy_dtype
from graphopt.onnx_io.random_ops import RANDOM_OPS
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

from .evaluate import (
    NON_TENSOR_OPS,
    QUANT_OPS,
    ConstantScope,
    array_bytes,
    evaluate,
    has_subgraphs,
    leaf_proto,
    tensor_bytes,
)

log = logging.getLogger(__name__)

# Ops whose output size depends on the values of their (small) inputs: sized before evaluation.
GROWTH_OPS = frozenset({"Expand", "Tile", "ConstantOfShape", "Range", "Pad", "Resize", "Upsample", "OneHot",
                        "CenterCropPad"})
# Elementwise ops broadcast: [N, 1] + [1, N] is N*N from 2N. Sized before evaluation when the input
# shapes are known, so two big constants cannot make the evaluator allocate gigabytes.
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "And", "Or", "Xor", "Equal", "Less",
                           "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min", "Sum", "Mean", "BitShift",
                           "PRelu"})
MAX_SWEEPS = 8
MAX_LOOP_TRIPS = 1024


@dataclass(frozen=True)
class FoldOptions:
    max_growth: float = 2.0
    always_fold_bytes: int = 1024
    fold_quantize: bool = False
    fold_subgraphs: bool = True

    @classmethod
    def from_context(cls, ctx: PassContext, name: str) -> FoldOptions:
        """Options ``fold-constants.<field>``; strings (from a command line) are converted."""
        default = cls()
        return cls(**{k: _coerce(getattr(default, k), ctx.option(name, k, getattr(default, k)))
                      for k in cls.__dataclass_fields__})

    def allows(self, out_bytes: int, in_bytes: int) -> bool:
        return out_bytes <= self.always_fold_bytes or out_bytes <= self.max_growth * in_bytes


def _coerce(default: object, value: object) -> object:
    if isinstance(default, bool) and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    description = "Evaluate nodes whose inputs are all constants (one onnxruntime session per sweep)"
    lossless = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = FoldOptions.from_context(ctx, self.name)
        total = 0
        for sweep in range(MAX_SWEEPS):
            graphs = list(model.graph.walk_graphs())
            scope = ConstantScope(model, graphs)
            folded, deferred = _Sweep(model, scope, opts).run(graphs)
            total += folded
            log.debug("fold-constants sweep %d: %d folded, deferred=%s", sweep, folded, deferred)
            if not folded or not deferred:
                break
        return PassResult(total)


class _Sweep:
    """One plan -> evaluate -> rewrite round over the whole model."""

    def __init__(self, model: Model, scope: ConstantScope, opts: FoldOptions) -> None:
        self.model, self.scope, self.opts = model, scope, opts
        self.batch: list[Node] = []
        self.leaves: dict[str, Tensor] = {}
        self.leaf_bytes: dict[int, int] = {}  # value id -> bytes, for constants the batch reads
        self.leaf_producers: list[Node] = []  # Constant nodes read by the batch
        self.available: set[int] = set()  # values the batch will compute
        self.deferred = False

    def run(self, graphs: list[Graph]) -> tuple[int, bool]:
        for graph in graphs:
            for node in graph:
                self._consider(node)
        if not self.batch:
            return 0, self.deferred
        protos = {name: leaf_proto(tensor, name) for name, tensor in self.leaves.items()}
        wanted = [o for n in self.batch for o in n.outputs]
        results = evaluate(self.model, self.batch, protos, wanted)
        return self._rewrite(results), self.deferred

    # -- planning ------------------------------------------------------------------------
    def _consider(self, node: Node) -> None:
        if node.op_type == "Constant":
            return
        found: list[tuple[Value, Tensor]] = []
        for value in node.inputs:  # cheap test first: most nodes of a network read activations
            if value is None or id(value) in self.available or id(value) in self.leaf_bytes:
                continue
            tensor = self.scope.constant_tensor(value)
            if tensor is None:
                return
            found.append((value, tensor))
        if not self._foldable(node):
            return
        if has_subgraphs(node):
            for value in dict.fromkeys(node.implicit_inputs()):
                if id(value) not in self.available and id(value) not in self.leaf_bytes:
                    tensor = self.scope.constant_tensor(value)
                    if tensor is None:
                        return
                    found.append((value, tensor))
        for value, tensor in found:
            if id(value) in self.leaf_bytes:
                continue
            self.leaves[value.name] = tensor
            self.leaf_bytes[id(value)] = tensor_bytes(tensor)
            if value.producer is not None:
                self.leaf_producers.append(value.producer)
        if node.op_type in GROWTH_OPS:
            fits = self._small_enough(node)
            if not fits:
                self.deferred |= fits is None  # sized once its inputs are initializers (next sweep)
                return
        if node.op_type in BROADCAST_OPS and not self._broadcast_small_enough(node):
            return
        self.batch.append(node)
        self.available.update(id(o) for o in node.outputs)

    def _foldable(self, node: Node) -> bool:
        if not node.outputs or not self.scope.is_standard(node):
            return False
        if node.op_type in RANDOM_OPS or node.op_type in NON_TENSOR_OPS:
            return False
        if node.op_type in QUANT_OPS and not self.opts.fold_quantize:
            return False
        if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            return False  # training_mode decides whether it draws random numbers
        if has_subgraphs(node):
            if not self.opts.fold_subgraphs or node.op_type == "Loop" and not self._bounded_loop(node):
                return False
            return all(self._foldable(inner) or inner.op_type == "Constant"
                       for sub in node.subgraphs() for inner in sub.walk_nodes())
        return True

    def _bounded_loop(self, node: Node) -> bool:
        """A Loop is evaluated at compile time only with a small constant trip count (a while-loop may not end)."""
        trips = self.scope.constant_tensor(node.inputs[0] if node.inputs else None)
        return trips is not None and trips.size == 1 and int(np.asarray(trips.numpy()).reshape(-1)[0]) <= MAX_LOOP_TRIPS

    def _small_enough(self, node: Node) -> bool | None:
        """Size a growth op before evaluating it: False when too big, None when not knowable yet."""
        out_bytes = _static_bytes(node.outputs[0]) if len(node.outputs) == 1 else None
        if out_bytes is None:
            out_bytes = _estimate_bytes(node, self.scope)
        if out_bytes is None:
            return None
        in_bytes = 0
        for value in node.inputs:
            if value is None:
                continue
            size = _static_bytes(value)
            if size is None:
                tensor = self.scope.constant_tensor(value)
                size = tensor_bytes(tensor) if tensor is not None else None
            if size is None:
                return None
            in_bytes += size
        return self.opts.allows(out_bytes, in_bytes)

    def _broadcast_small_enough(self, node: Node) -> bool:
        shapes = []
        for value in node.inputs:
            if value is None:
                continue
            tensor = self.scope.constant_tensor(value)
            shape = tensor.shape if tensor is not None else value.shape
            if shape is None or not all(isinstance(d, int) for d in shape):
                return True  # (an intermediate of this batch without a static type: checked after evaluation)
            shapes.append(tuple(shape))
        try:
            out = math.prod(np.broadcast_shapes(*shapes))
        except ValueError:
            return False
        in_elements = sum(math.prod(s) for s in shapes)
        return self.opts.allows(out, in_elements * 8)  # lenient (1-byte out, 8-byte in): the exact check follows

    # -- rewriting -----------------------------------------------------------------------
    def _rewrite(self, results: dict[int, np.ndarray]) -> int:
        constant = dict(self.leaf_bytes)  # value id -> bytes, for values that are constant after this sweep
        folded: list[Node] = []
        for node in self.batch:
            arrays = self._outputs_of(node, results)
            if arrays is None:
                continue
            reads = _reads(node)
            if not all(id(v) in constant for v in reads):
                continue
            in_bytes = sum(constant[id(v)] for v in dict.fromkeys(reads))
            out_bytes = sum(array_bytes(a) for a in arrays if a is not None)
            if not self.opts.allows(out_bytes, in_bytes):
                log.debug("not folding %s: %d bytes from %d", node.label(), out_bytes, in_bytes)
                continue
            for out, array in zip(node.outputs, arrays, strict=True):
                if array is not None:
                    constant[id(out)] = array_bytes(array)
            if node.graph.parent is not None or not any(self.scope.is_output(o) for o in node.outputs):
                # A main-graph output stays computed (some runtimes reject an initializer as a model
                # output); a body's output may be a constant of that body (onnxruntime runs it).
                folded.append(node)
        for node in reversed(folded):
            _materialize(node, [results.get(id(o)) for o in node.outputs])
        removed = 0
        for producer in dict.fromkeys(self.leaf_producers):
            if producer.graph is not None and not any(o.has_uses() or self.scope.is_output(o)
                                                      for o in producer.outputs):
                producer.graph.erase(producer)
                removed += 1
        return len(folded) + removed

    def _outputs_of(self, node: Node, results: dict[int, np.ndarray]) -> list[np.ndarray | None] | None:
        arrays = []
        for out in node.outputs:
            array = results.get(id(out))
            if array is None and out.name and (out.has_uses() or self.scope.is_output(out)):
                return None
            arrays.append(array)
        return arrays


def _reads(node: Node) -> list[Value]:
    """Explicit inputs and, for nodes with subgraphs, the outer values their bodies read."""
    reads = [v for v in node.inputs if v is not None]
    return reads + node.implicit_inputs() if has_subgraphs(node) else reads


def _materialize(node: Node, arrays: list[np.ndarray | None]) -> None:
    """Replace a folded node by initializers that keep its output names."""
    graph = node.graph
    outputs = node.outputs
    needed = [out.has_uses() or out.is_graph_output() for out in outputs]  # (erasing detaches them)
    graph.erase(node, keep_outputs=True)
    for out, array, keep in zip(outputs, arrays, needed, strict=True):
        if array is None or not keep:
            continue
        tensor = ArrayTensor(np.asarray(array), out.name)
        out.const = tensor
        out.type = TensorType(tensor.elem_type, tensor.shape)
        graph.add_initializer(out)


def _static_bytes(value: Value) -> int | None:
    t = value.type
    if not isinstance(t, TensorType) or not t.is_static() or t.elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        itemsize = numpy_dtype(t.elem_type).itemsize
    except Exception:  # noqa: BLE001 - exotic element types: size unknown
        return None
    return math.prod(t.shape) * itemsize


def _estimate_bytes(node: Node, scope: ConstantScope) -> int | None:
    """Output bytes of a growth op computed from its constant inputs (None: cannot tell yet)."""

    def const(i: int) -> np.ndarray | None:
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        tensor = scope.constant_tensor(node.inputs[i])
        return None if tensor is None else np.asarray(tensor.numpy())

    def shape_of(i: int) -> tuple[int, ...] | None:
        value = node.inputs[i]
        tensor = scope.constant_tensor(value)
        if tensor is not None:
            return tuple(tensor.shape)
        t = value.type
        return tuple(t.shape) if isinstance(t, TensorType) and t.is_static() else None

    op = node.op_type
    try:
        if op == "ConstantOfShape":
            shape = const(0)
            attr = node.attr("value")
            itemsize = attr.dtype.itemsize if attr is not None else 4
            return None if shape is None else math.prod(int(d) for d in shape.reshape(-1)) * itemsize
        if op in ("Expand", "Tile"):
            target, shape = const(1), shape_of(0)
            if target is None or shape is None:
                return None
            itemsize = _itemsize(node.inputs[0], scope)
            if op == "Expand":
                out = np.broadcast_shapes(shape, tuple(int(d) for d in target.reshape(-1)))
            else:
                out = tuple(int(s) * int(r) for s, r in zip(shape, target.reshape(-1), strict=True))
            return None if itemsize is None else math.prod(out) * itemsize
        if op == "Range":
            start, limit, delta = const(0), const(1), const(2)
            if start is None or limit is None or delta is None:
                return None
            count = max(int(np.ceil((limit.item() - start.item()) / delta.item())), 0)
            return count * start.dtype.itemsize
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None
    return None


def _itemsize(value: Value, scope: ConstantScope) -> int | None:
    tensor = scope.constant_tensor(value)
    if tensor is not None:
        return tensor.dtype.itemsize
    t = value.type
    if isinstance(t, TensorType) and t.elem_type:
        return numpy_dtype(t.elem_type).itemsize
    return None
