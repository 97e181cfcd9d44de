"""Common subexpressions: equal constants first, then equal nodes, in one sweep per graph.

``dedupe-initializers`` merges initializers holding the same tensor;
``eliminate-common-subexpressions`` does that for Constant nodes too, then
merges nodes that apply the same op with the same attributes to the same input
values. Both are near-linear:

* constants are grouped by (dtype, shape) first, from metadata alone; only
  tensors that share both with another one are read, and then only a small
  sample (first and last 4 KiB) before the full digest, so distinct large
  weights are never read in full. Equal means equal bytes (so ``-0.0`` differs
  from ``0.0`` and a NaN equals a NaN with the same payload), identified by a
  256-bit BLAKE2b digest.
* nodes are keyed by (domain, op, attributes, input identities, output arity)
  in one topological sweep; because a merged node's uses are redirected before
  its users are visited, whole duplicated chains collapse in one pass.

Never merged: random ops (their outputs differ run to run), ops of unknown
domains and model-local functions, nodes with subgraphs (If/Loop/Scan), and
initializers that are also graph inputs (the caller may override them).
Each graph is processed on its own; values of enclosing graphs are plain
inputs here, so outer-scope references are respected.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from graphopt.ir import AttrType, Graph, Model, Node, SourceTensor, Tensor, Value
from graphopt.ir.tensor import little_endian_bytes
from graphopt.onnx_io.random_ops import MAY_DRAW_RANDOM
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

from .util import Scope, constant_tensor, erase_dead, replace_output

log = logging.getLogger(__name__)

COMMUTATIVE = frozenset({"Add", "Mul", "And", "Or", "Xor", "Equal", "BitwiseAnd", "BitwiseOr", "BitwiseXor"})
"""Binary ops whose operands can be swapped bit-exactly (broadcasting is symmetric too).
Max/Min/Sum/Mean are left out: NaN handling or summation order may depend on operand order."""

_SAMPLE = 4096


# -- constants -----------------------------------------------------------------------
@dataclass
class _Constant:
    value: Value
    tensor: Tensor
    node: Node | None  # the Constant node, or None for an initializer


def _constants(graph: Graph, scope: Scope, include_nodes: bool) -> Iterator[_Constant]:
    """Initializers (not graph inputs) first, then Constant nodes in graph order."""
    for value in graph.initializers.values():
        if id(value) not in scope.input_ids:
            yield _Constant(value, value.const, None)
    if include_nodes:
        for node in graph:
            if node.op_type == "Constant":
                tensor = constant_tensor(node.outputs[0], scope)
                if tensor is not None:
                    yield _Constant(node.outputs[0], tensor, node)


def _raw(tensor: Tensor, sample: bool) -> bytes | memoryview | np.ndarray:
    """The tensor's little-endian bytes (or just their head and tail), read as cheaply as possible."""
    dtype = tensor.dtype
    if isinstance(tensor, SourceTensor) and dtype.kind != "O" and tensor.length == tensor.size * dtype.itemsize:
        if sample and tensor.length > 2 * _SAMPLE:
            return bytes(tensor.source.read(tensor.offset, _SAMPLE)) + bytes(
                tensor.source.read(tensor.offset + tensor.length - _SAMPLE, _SAMPLE))
        return tensor.raw_bytes()
    array = tensor.numpy()
    if array.dtype.kind == "O":  # strings: length-prefixed, so ["ab", "c"] != ["a", "bc"]
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        return b"".join(len(v).to_bytes(8, "little") + v for v in items)
    data = little_endian_bytes(array)
    return data[:_SAMPLE].tobytes() + data[-_SAMPLE:].tobytes() if sample and len(data) > 2 * _SAMPLE else data


#: Digests of file-backed tensors (their bytes never change): the pass manager runs CSE and
#: dedupe-initializers once per iteration, and re-reading every weight each time was most of their time.
_FILE_DIGESTS: weakref.WeakKeyDictionary[SourceTensor, dict[bool, bytes]] = weakref.WeakKeyDictionary()


def _digest(tensor: Tensor, sample: bool = False) -> bytes:
    if not isinstance(tensor, SourceTensor):
        return hashlib.blake2b(_raw(tensor, sample), digest_size=32).digest()
    known = _FILE_DIGESTS.get(tensor)
    if known is None:
        known = _FILE_DIGESTS[tensor] = {}
    digest = known.get(sample)
    if digest is None:
        digest = known[sample] = hashlib.blake2b(_raw(tensor, sample), digest_size=32).digest()
    return digest


def _groups(items: list[_Constant], key) -> Iterator[list[_Constant]]:
    """Groups of two or more items with equal ``key(item)``."""
    groups: dict[object, list[_Constant]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return (g for g in groups.values() if len(g) > 1)


def equal_constant_groups(constants: list[_Constant]) -> Iterator[list[_Constant]]:
    """Groups of constants holding byte-identical tensors, each in its original order.

    Metadata first, then a sample, then the full digest: each stage reads only
    the tensors the previous one could not tell apart.
    """
    for same_type in _groups(constants, lambda c: (c.tensor.elem_type, tuple(c.tensor.shape))):
        big = same_type[0].tensor.size * same_type[0].tensor.dtype.itemsize > 2 * _SAMPLE
        candidates = _groups(same_type, lambda c: _digest(c.tensor, sample=True)) if big else [same_type]
        for group in candidates:
            yield from _groups(group, lambda c: _digest(c.tensor))


def merge_constants(graph: Graph, scope: Scope, include_nodes: bool) -> int:
    """Point the uses of every duplicate constant at the first equal one; returns how many went."""
    merged = 0
    for group in equal_constant_groups(list(_constants(graph, scope, include_nodes))):
        keep = group[0].value
        for dup in group[1:]:
            changed = dup.value.has_uses()
            if replace_output(dup.value, keep, graph, scope) is not None:
                dup.value.replace_all_uses_with(keep)  # a graph output stays, but its readers can share
            if dup.node is not None:
                changed |= erase_dead(dup.node, scope)
            elif not dup.value.has_uses() and not scope.is_output(dup.value):
                graph.remove_initializer(dup.value.name)
                changed = True
            merged += changed
    return merged


# -- nodes ---------------------------------------------------------------------------
def _attr_key(node: Node) -> tuple | None:
    """A hashable, exact key of the node's attributes (None: a subgraph or an unknown kind)."""
    items = []
    for name in sorted(node.attrs):
        attr = node.attrs[name]
        if attr.type in (AttrType.GRAPH, AttrType.GRAPHS):
            return None
        value = _freeze(attr.value)
        if value is None and attr.value is not None:
            return None
        items.append((name, int(attr.type), value, attr.ref_attr_name))
    return tuple(items)


def _freeze(value):
    """Floats by their bits (``-0.0`` is not ``0.0``), tensors by digest, lists as tuples."""
    if isinstance(value, float):
        return ("f", value.hex())
    if isinstance(value, int | str | bytes) or value is None:
        return value
    if isinstance(value, Tensor):
        return ("t", value.elem_type, tuple(value.shape), _digest(value))
    if isinstance(value, list | tuple):
        items = tuple(_freeze(v) for v in value)
        return None if any(i is None for i in items) else items
    return None


def node_key(node: Node, scope: Scope) -> tuple | None:
    """What makes two nodes compute the same outputs (None: never merge this node)."""
    if node.op_type in MAY_DRAW_RANDOM or not scope.is_known_op(node) or not node.outputs:
        return None
    attrs = _attr_key(node)
    if attrs is None:
        return None
    inputs = tuple(id(v) if v is not None else None for v in node.inputs)
    if node.op_type in COMMUTATIVE and len(inputs) == 2 and None not in inputs:
        inputs = tuple(sorted(inputs))
    shape = tuple(bool(out.name) for out in node.outputs)  # which optional outputs exist
    return (node.domain or "ai.onnx", node.op_type, node.overload, attrs, inputs, shape)


def _merge_into(dup: Node, keep: Node, graph: Graph, scope: Scope) -> bool:
    """Replace ``dup``'s outputs by ``keep``'s and erase ``dup``; False (nothing changed) if not allowed."""
    for mine, theirs in zip(dup.outputs, keep.outputs, strict=True):
        if scope.is_output(mine) and scope.is_output(theirs):
            return False  # two interface names cannot share one value
    for mine, theirs in zip(dup.outputs, keep.outputs, strict=True):
        if mine.name:
            replace_output(mine, theirs, graph, scope)  # keep's outputs are plain: renaming is legal
    return erase_dead(dup, scope)


def merge_nodes(graph: Graph, scope: Scope) -> int:
    """Merge every node into an earlier equal one, in one topological sweep."""
    seen: dict[tuple, Node] = {}
    merged = 0
    for node in graph:
        if node.op_type == "Constant" and constant_tensor(node.outputs[0], scope) is not None:
            continue  # compared by value in merge_constants
        key = node_key(node, scope)
        if key is None:
            continue
        keep = seen.setdefault(key, node)
        if keep is not node and _merge_into(node, keep, graph, scope):
            merged += 1
    return merged


@register_pass
class EliminateCommonSubexpressions(Pass):
    name = "eliminate-common-subexpressions"
    description = "Merge equal constants (initializers and Constant nodes), then nodes computing the same thing"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = Scope(model)
        constants = nodes = 0
        for graph in scope.graphs:
            if graph.parent is not None and graph.parent.graph is None:
                continue  # inside a node merged away earlier in this sweep
            constants += merge_constants(graph, scope, include_nodes=True)
            nodes += merge_nodes(graph, scope)
        log.debug("%s: %d constants, %d nodes merged", self.name, constants, nodes)
        return PassResult(constants + nodes, {"constants": constants, "nodes": nodes})


@register_pass
class DedupeInitializers(Pass):
    name = "dedupe-initializers"
    description = "Merge initializers holding byte-identical tensors (those that are also graph inputs stay)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        scope = Scope(model)
        merged = sum(merge_constants(graph, scope, include_nodes=False) for graph in scope.graphs)
        return PassResult(merged)
