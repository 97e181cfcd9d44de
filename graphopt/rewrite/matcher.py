"""Matching a pattern at an anchor node, with the reason when it does not match.

Matching walks backwards from the anchor (the pattern's root node) through
producers. It never changes the IR; a commutative op tries both input orders
(backtracking through generators). Of the constraints that failed, the one reached with
the most pattern nodes already matched is kept (the first of those on a tie), so ``explain``
answers "why didn't my rule fire here" with the nearest miss, not with the first input order a
commutative op tried.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..ir import Node, Value
from .pattern import Const, NodePattern, Opt, Out, ValuePattern, Var


@dataclass
class Match:
    """A successful match: the anchor, every matched node (anchor first) and the bindings by name."""

    root: Node
    nodes: list[Node]
    bindings: dict[str, Any]
    outputs: list[Value] = field(default_factory=list)


@dataclass
class _State:
    bindings: dict[str, Any]
    nodes: dict[int, Node]  # id(NodePattern) -> Node

    def bind(self, key: str, value: Any) -> _State:
        return _State({**self.bindings, key: value}, self.nodes)

    def with_node(self, pattern: NodePattern, node: Node) -> _State:
        bindings = {**self.bindings, pattern.name: node} if pattern.name else self.bindings
        return _State(bindings, {**self.nodes, id(pattern): node})


class Matcher:
    """Matches one pattern; ``match`` returns a Match or None and leaves the reason in ``failure``."""

    def __init__(self, outputs: list[Out]) -> None:
        self.outputs = outputs
        self.root = outputs[0].node
        self.failure: str | None = None
        self._depth: tuple[bool, int, int] | None = None  # how far the match got when ``failure`` happened

    def match(self, node: Node) -> Match | None:
        self.failure, self._depth = None, None
        for state in self._node(self.root, node, _State({}, {})):
            nodes = list(dict.fromkeys(state.nodes.values()))
            outputs = [state.nodes[id(o.node)].outputs[o.index] for o in self.outputs]
            problem = _escaping_intermediate(nodes, node, outputs) or self._unreplaced_root_output(node)
            if problem is None:
                return Match(node, nodes, state.bindings, outputs)
            self._fail(problem, state, past_structure=True)
        return None

    def _unreplaced_root_output(self, node: Node) -> str | None:
        covered = {o.index for o in self.outputs if o.node is self.root}
        for i, out in enumerate(node.outputs):
            if i not in covered and (out.has_uses() or out.is_graph_output()):
                return f"{node.label()}: output {out.name!r} is used but the pattern does not cover it"
        return None

    def _fail(self, reason: str, state: _State, past_structure: bool = False) -> None:
        """Keep ``reason`` if it is the furthest failure so far: most pattern nodes matched, then most
        variables bound; a whole structural match counts as further than any partial one."""
        depth = (past_structure, len(state.nodes), len(state.bindings))
        if self._depth is None or depth > self._depth:
            self.failure, self._depth = reason, depth

    # -- nodes -------------------------------------------------------------------------
    def _node(self, pattern: NodePattern, node: Node, state: _State) -> Iterator[_State]:
        seen = state.nodes.get(id(pattern))
        if seen is not None:
            if seen is node:
                yield state
            else:
                self._fail(f"{pattern.label} must be the same node as {seen.label()}, got {node.label()}", state)
            return
        reason = _check_node(pattern, node)
        if reason:
            self._fail(reason, state)
            return
        state = state.with_node(pattern, node)
        inputs = list(node.inputs) + [None] * (len(pattern.inputs) - len(node.inputs))
        orders = [pattern.inputs]
        if pattern.commute and len(pattern.inputs) == 2:
            orders.append(pattern.inputs[::-1])
        for order in orders:
            yield from self._inputs(order, inputs, 0, node, state)

    def _inputs(self, patterns, values, index: int, node: Node, state: _State) -> Iterator[_State]:
        if index == len(patterns):
            yield state
            return
        for next_state in self._value(patterns[index], values[index], node, index, state):
            yield from self._inputs(patterns, values, index + 1, node, next_state)

    # -- values ------------------------------------------------------------------------
    def _value(self, pattern: ValuePattern | None, value: Value | None, user: Node, index: int,
               state: _State) -> Iterator[_State]:
        where = f"input {index} of {user.label()}"
        if pattern is None:
            if value is None:
                yield state
            else:
                self._fail(f"{where}: expected no input, got {value.name!r}", state)
            return
        if isinstance(pattern, Opt):
            if value is None:
                yield state.bind(pattern.name, None) if pattern.name else state
            else:
                yield from self._value(pattern.inner, value, user, index, state)
            return
        if value is None:
            self._fail(f"{where}: the input is missing", state)
            return
        if isinstance(pattern, Var):
            yield from self._var(pattern.name, value, where, state)
        elif isinstance(pattern, Const):
            yield from self._const(pattern, value, where, state)
        elif isinstance(pattern, Out):
            producer = value.producer
            if producer is None or producer.graph is not user.graph:
                kind = "a constant" if value.const is not None else "a graph input or outer value"
                self._fail(f"{where}: expected the output of {pattern.node.label}, got {kind} {value.name!r}",
                           state)
            elif value.index != pattern.index:
                self._fail(f"{where}: expected output {pattern.index} of {producer.label()}, got {value.index}",
                           state)
            else:
                yield from self._node(pattern.node, producer, state)

    def _var(self, name: str, value: Value, where: str, state: _State) -> Iterator[_State]:
        bound = state.bindings.get(name)
        if bound is None:
            yield state.bind(name, value)
        elif bound is value:
            yield state
        else:
            self._fail(f"{where}: {name} is {bound.name!r} elsewhere in the pattern but {value.name!r} here",
                       state)

    def _const(self, pattern: Const, value: Value, where: str, state: _State) -> Iterator[_State]:
        if value.const is None or value.is_graph_input():
            self._fail(f"{where}: expected a constant, got {value.name!r} (computed or a graph input)", state)
            return
        if pattern.where is not None and not pattern.where(value.const.numpy()):
            self._fail(f"{where}: constant {value.name!r} fails the pattern's predicate", state)
            return
        if pattern.name is None:
            yield state
        else:
            yield from self._var(pattern.name, value, where, state)


def _check_node(pattern: NodePattern, node: Node) -> str | None:
    """Op, domain, arity and attribute constraints of one node; the reason if one fails."""
    if node.op_type not in pattern.op_types:
        return f"{node.label()}: expected op {pattern.label}, got {node.op_type}"
    if node.domain not in (pattern.domain, "ai.onnx" if pattern.domain == "" else pattern.domain):
        return f"{node.label()}: expected domain {pattern.domain!r}, got {node.domain!r}"
    if len(node.inputs) > len(pattern.inputs):
        return f"{node.label()}: has {len(node.inputs)} inputs, the pattern expects {len(pattern.inputs)}"
    if len(node.outputs) < pattern.num_outputs:
        return f"{node.label()}: has {len(node.outputs)} outputs, the pattern expects {pattern.num_outputs}"
    for name, expected in pattern.attrs.items():
        actual = node.attr(name)
        ok = expected(actual) if callable(expected) else actual == expected
        if not ok:
            want = "a value passing the predicate" if callable(expected) else repr(expected)
            return f"{node.label()}: attribute {name}={actual!r}, expected {want}"
    return None


def _escaping_intermediate(nodes: list[Node], root: Node, exposed: list[Value]) -> str | None:
    """Intermediate results must not be used outside the match (the rewrite removes them), unless the
    pattern exposes them (the replacement then gives their readers a new value)."""
    inside = {id(n) for n in nodes}
    replaced = {id(v) for v in exposed}
    for node in nodes:
        if node is root:
            continue
        for out in node.outputs:
            if id(out) in replaced:
                continue
            if out.is_graph_output():
                return f"{out.name!r} (from {node.label()}) is a graph output, so {node.label()} must stay"
            for user, _ in out.uses():
                if id(user) not in inside:
                    return f"{out.name!r} (from {node.label()}) is also used by {user.label()} outside the pattern"
    return None
