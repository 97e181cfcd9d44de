"""The mutable graph IR: Value, Node, Graph with use-def lists kept in sync.

Modelled on torch.fx and onnx-ir: every Value knows its producer and its uses,
and the uses change only through :meth:`Node.set_input` (and what calls it), so
they cannot drift from the node inputs. Nodes form a doubly linked list per
graph, so insertion and erasure are O(1) even on 200k-node graphs.

A subgraph (If/Loop/Scan body) is a Graph whose ``parent`` is the node holding
it; a node in a subgraph may use a Value of an enclosing graph directly (an
outer-scope reference), and that use is recorded on the outer Value like any
other, so ``replace_all_uses_with`` reaches into bodies for free.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..errors import GraphStructureError
from .tensor import Tensor
from .types import Attr, TensorType, ValueType


class ValueList(list):
    """A list of values that answers ``holds(value)`` in O(1) (graph inputs and outputs).

    Graphs can have thousands of outputs, and passes ask "is this a graph output?"
    for every node they touch.
    """

    def __init__(self, values: Iterable[Value] = ()) -> None:
        super().__init__(values)
        self._count: dict[int, int] = {}
        for value in self:
            self._add(value)

    def _add(self, value: Value) -> None:
        self._count[id(value)] = self._count.get(id(value), 0) + 1

    def _drop(self, value: Value) -> None:
        left = self._count[id(value)] - 1
        if left:
            self._count[id(value)] = left
        else:
            del self._count[id(value)]

    def holds(self, value: Value) -> bool:
        return id(value) in self._count

    def append(self, value: Value) -> None:
        super().append(value)
        self._add(value)

    def extend(self, values: Iterable[Value]) -> None:
        for value in values:
            self.append(value)

    def insert(self, index: int, value: Value) -> None:
        super().insert(index, value)
        self._add(value)

    def remove(self, value: Value) -> None:
        super().remove(value)
        self._drop(value)

    def pop(self, index: int = -1) -> Value:
        value = super().pop(index)
        self._drop(value)
        return value

    def clear(self) -> None:
        super().clear()
        self._count.clear()

    def __setitem__(self, index, value) -> None:
        old = self[index]
        for item in old if isinstance(index, slice) else [old]:
            self._drop(item)
        super().__setitem__(index, value)
        for item in value if isinstance(index, slice) else [value]:
            self._add(item)

    def __delitem__(self, index) -> None:
        old = self[index]
        for item in old if isinstance(index, slice) else [old]:
            self._drop(item)
        super().__delitem__(index)

    def __iadd__(self, values: Iterable[Value]) -> ValueList:
        self.extend(values)
        return self


class Value:
    """An SSA value: a graph input, an initializer, or a node output."""

    __slots__ = ("name", "type", "producer", "index", "_uses", "const", "doc_string", "metadata", "graph", "meta",
                 "in_value_info")

    def __init__(
        self,
        name: str = "",
        type: ValueType | None = None,  # noqa: A002 - mirrors ONNX naming
        *,
        const: Tensor | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.index = 0
        self._uses: dict[tuple[Node, int], None] = {}
        self.const = const
        self.doc_string = ""
        self.metadata: dict[str, str] = {}  # ONNX ValueInfoProto.metadata_props
        # Declared in the graph's value_info (kept for initializers and inputs of
        # subgraphs, which exporters sometimes describe there too).
        self.in_value_info = False
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}

    def uses(self) -> list[tuple[Node, int]]:
        """(node, input index) pairs that read this value, including in subgraphs."""
        return list(self._uses)

    def users(self) -> list[Node]:
        """Distinct nodes that read this value."""
        return list(dict.fromkeys(node for node, _ in self._uses))

    def has_uses(self) -> bool:
        return bool(self._uses)

    def is_graph_output(self) -> bool:
        return self.graph is not None and self.graph.outputs.holds(self)

    def is_graph_input(self) -> bool:
        return self.graph is not None and self.graph.inputs.holds(self)

    def is_initializer(self) -> bool:
        return self.graph is not None and self.graph.initializers.get(self.name) is self

    @property
    def shape(self) -> tuple | None:
        return self.type.shape if isinstance(self.type, TensorType) else None

    @property
    def elem_type(self) -> int | None:
        return self.type.elem_type if isinstance(self.type, TensorType) else None

    def replace_all_uses_with(self, new: Value, *, include_graph_outputs: bool = False) -> int:
        """Point every use of this value at ``new``; returns the number of uses changed.

        Graph outputs are left alone unless asked, because changing them changes
        the model's interface (their names).
        """
        count = 0
        for node, index in self.uses():
            node.set_input(index, new)
            count += 1
        if include_graph_outputs and self.is_graph_output():
            outputs = self.graph.outputs
            for i, out in enumerate(outputs):
                if out is self:
                    outputs[i] = new
                    count += 1
        return count

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


class Node:
    """An operator application: op type, domain, attributes, input and output values."""

    __slots__ = (
        "op_type", "domain", "overload", "name", "attrs", "_inputs", "_outputs",
        "doc_string", "metadata", "graph", "meta", "_prev", "_next",
    )

    def __init__(
        self,
        op_type: str,
        inputs: Sequence[Value | None] = (),
        attrs: dict[str, Attr] | dict[str, Any] | None = None,
        *,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        name: str = "",
        overload: str = "",
        doc_string: str = "",
    ) -> None:
        self.op_type = op_type
        self.domain = domain
        self.overload = overload
        self.name = name
        self.attrs: dict[str, Attr] = {
            k: v if isinstance(v, Attr) else Attr.infer(k, v) for k, v in (attrs or {}).items()
        }
        self.doc_string = doc_string
        self.metadata: dict[str, str] = {}
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None
        self._inputs: list[Value | None] = []
        for value in inputs:
            self._inputs.append(None)
            self.set_input(len(self._inputs) - 1, value)
        names = [""] * outputs if isinstance(outputs, int) else list(outputs)
        self._outputs: list[Value] = []
        for name_ in names:
            self._add_output(Value(name_))
        for attr in self.attrs.values():
            for sub in attr.graphs():
                sub.parent = self

    # -- inputs and outputs --------------------------------------------------------
    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    def set_input(self, index: int, value: Value | None) -> None:
        """Set input ``index`` (None = omitted optional input), keeping use lists in sync."""
        old = self._inputs[index]
        if old is not None:
            old._uses.pop((self, index), None)
        self._inputs[index] = value
        if value is not None:
            value._uses[(self, index)] = None

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        """Replace the whole input list."""
        self._detach_inputs()
        self._inputs = [None] * len(values)
        for i, value in enumerate(values):
            self.set_input(i, value)

    def replace_input_with(self, old: Value, new: Value | None) -> None:
        for i, value in enumerate(self._inputs):
            if value is old:
                self.set_input(i, new)

    def _add_output(self, value: Value) -> Value:
        value.producer, value.index, value.graph = self, len(self._outputs), self.graph
        self._outputs.append(value)
        return value

    def _detach_inputs(self) -> None:
        for i in range(len(self._inputs)):
            self.set_input(i, None)

    # -- attributes and subgraphs --------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The value of attribute ``name`` or ``default``."""
        attr = self.attrs.get(name)
        return default if attr is None else attr.value

    def set_attr(self, name: str, value: Any) -> None:
        attr = value if isinstance(value, Attr) else Attr.infer(name, value)
        self.attrs[name] = attr
        for sub in attr.graphs():
            sub.parent = self

    def subgraphs(self) -> list[Graph]:
        if not self.attrs:
            return []
        return [g for attr in self.attrs.values() for g in attr.graphs()]

    def implicit_inputs(self) -> list[Value]:
        """Values from outside this node's subgraphs that the subgraphs read (outer scope)."""
        if not self.subgraphs():
            return []
        inner = {id(g) for sub in self.subgraphs() for g in sub.walk_graphs()}
        found: dict[int, Value] = {}
        for sub in self.subgraphs():
            for node in sub.walk_nodes():
                for value in node._inputs:
                    if value is not None and id(value.graph) not in inner:
                        found.setdefault(id(value), value)
        return list(found.values())

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type

    def label(self) -> str:
        """How errors and reports name this node."""
        return self.name or f"<unnamed {self.op_type} -> {', '.join(o.name for o in self._outputs)}>"

    def __repr__(self) -> str:
        return f"Node({self.qualified_op}, name={self.name!r})"


class Graph:
    """An ordered graph of nodes with inputs, outputs and initializers."""

    def __init__(
        self,
        name: str = "",
        inputs: Iterable[Value] = (),
        outputs: Iterable[Value] = (),
        nodes: Iterable[Node] = (),
        initializers: Iterable[Value] = (),
        *,
        doc_string: str = "",
    ) -> None:
        self.name = name
        self.doc_string = doc_string
        self.metadata: dict[str, str] = {}
        self.parent: Node | None = None
        self._sentinel = Node("<sentinel>", outputs=0)
        self._sentinel._prev = self._sentinel._next = self._sentinel
        self._len = 0
        self._inputs = ValueList()
        self._outputs = ValueList()
        self.initializers: dict[str, Value] = {}
        for value in inputs:
            self.add_input(value)
        for value in initializers:
            self.add_initializer(value)
        for node in nodes:
            self.append(node)
        self.outputs = outputs
        # Opaque GraphProto fields graphopt does not model (quantization annotations,
        # sparse initializers), kept as serialized bytes by field number.
        self.extras: dict[int, list[bytes]] = {}
        self._taken_names: set[str] | None = None
        self._name_counters: dict[str, int] = {}

    @property
    def inputs(self) -> ValueList:
        return self._inputs

    @inputs.setter
    def inputs(self, values: Iterable[Value]) -> None:
        self._inputs = ValueList(values)

    @property
    def outputs(self) -> ValueList:
        """Graph outputs, in order (assign any iterable; it is kept as a ValueList)."""
        return self._outputs

    @outputs.setter
    def outputs(self, values: Iterable[Value]) -> None:
        self._outputs = ValueList(values)

    # -- node list -----------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        """Nodes in order. Erasing the node just yielded is safe."""
        node = self._sentinel._next
        while node is not self._sentinel:
            nxt = node._next
            yield node
            node = nxt

    def __len__(self) -> int:
        return self._len

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    def _link(self, node: Node, before: Node) -> None:
        if node.graph is not None:
            raise ValueError(f"{node!r} already belongs to a graph")
        node.graph = self
        for out in node._outputs:
            out.graph = self
        node._prev, node._next = before._prev, before
        before._prev._next = node
        before._prev = node
        self._len += 1

    def append(self, node: Node) -> Node:
        self._link(node, self._sentinel)
        return node

    def insert_before(self, anchor: Node, nodes: Node | Sequence[Node]) -> None:
        for node in [nodes] if isinstance(nodes, Node) else nodes:
            self._link(node, anchor)

    def insert_after(self, anchor: Node, nodes: Node | Sequence[Node]) -> None:
        self.insert_before(anchor._next, nodes)

    def erase(self, node: Node, *, keep_outputs: bool = False) -> None:
        """Remove a node whose outputs nobody uses; its input uses (and its subgraphs') are dropped.

        ``keep_outputs=True`` detaches the outputs instead, uses and all, so the
        caller can re-home them (e.g. as initializers that replace a Constant node).
        """
        if node.graph is not self:
            raise ValueError(f"{node!r} is not in graph {self.name!r}")
        for out in node._outputs if not keep_outputs else ():
            if out.has_uses() or out.is_graph_output():
                users = ", ".join(u.label() for u in out.users()) or "graph output"
                raise GraphStructureError(f"cannot erase: output {out.name!r} is still used by {users}",
                                          node=node.label())
        node._detach_inputs()
        for sub in node.subgraphs():
            for inner in sub.walk_nodes():
                inner._detach_inputs()
        if keep_outputs:
            for out in node._outputs:
                out.producer, out.graph = None, None
            node._outputs = []
        node._prev._next, node._next._prev = node._next, node._prev
        node._prev = node._next = None
        node.graph = None
        self._len -= 1

    # -- values --------------------------------------------------------------------
    def add_input(self, value: Value) -> Value:
        value.graph = self
        self.inputs.append(value)
        return value

    def add_initializer(self, value: Value | Tensor, name: str | None = None) -> Value:
        """Register a constant; a Tensor is wrapped into a fresh Value named after it."""
        if isinstance(value, Tensor):
            tensor = value
            value = Value(name or tensor.name or self.fresh_name("const"), const=tensor)
            value.type = TensorType(tensor.elem_type, tensor.shape)
        if value.const is None:
            raise ValueError(f"initializer {value.name!r} has no tensor")
        if value.name in self.initializers and self.initializers[value.name] is not value:
            raise GraphStructureError(f"duplicate initializer name {value.name!r}")
        value.graph = self
        self.initializers[value.name] = value
        return value

    def remove_initializer(self, name: str) -> None:
        value = self.initializers[name]
        if value.has_uses() or value.is_graph_output():
            raise GraphStructureError(f"initializer {name!r} is still used")
        del self.initializers[name]
        value.graph = None

    def values(self) -> Iterator[Value]:
        """Every value defined in this graph (not in subgraphs)."""
        yield from self.inputs
        yield from (v for v in self.initializers.values() if not self.inputs.holds(v))
        for node in self:
            yield from node._outputs

    # -- nesting -------------------------------------------------------------------
    @property
    def root(self) -> Graph:
        graph = self
        while graph.parent is not None and graph.parent.graph is not None:
            graph = graph.parent.graph
        return graph

    def walk_graphs(self) -> Iterator[Graph]:
        """This graph and every subgraph nested in it, outermost first."""
        yield self
        for node in self:
            for sub in node.subgraphs():
                yield from sub.walk_graphs()

    def walk_nodes(self) -> Iterator[Node]:
        for graph in self.walk_graphs():
            yield from graph

    def fresh_name(self, prefix: str) -> str:
        """A value/node name unused anywhere in the model (SSA names are model-global)."""
        root = self.root
        taken = root._taken_names
        if taken is None:
            taken = root._taken_names = set()
            for graph in root.walk_graphs():
                taken.update(v.name for v in graph.values())
                taken.update(n.name for n in graph)
        if prefix not in taken:
            taken.add(prefix)
            return prefix
        counters = root._name_counters
        for i in itertools.count(counters.get(prefix, 0)):
            name = f"{prefix}_{i}"
            if name not in taken:
                taken.add(name)
                counters[prefix] = i + 1  # next call starts here: linear, not quadratic, per prefix
                return name
        raise AssertionError("unreachable")

    # -- order ---------------------------------------------------------------------
    def toposort(self) -> None:
        """Reorder nodes topologically, keeping the current order where it is free.

        Raises GraphStructureError naming the nodes on a cycle.
        """
        from .order import topological_order

        order = topological_order(self)
        node = self._sentinel
        for nxt in order:
            node._next, nxt._prev = nxt, node
            node = nxt
        node._next, self._sentinel._prev = self._sentinel, node

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {self._len} nodes)"
