"""A small rewrite-rule engine: rules as data, applied in one forward sweep per graph.

A :class:`Rule` names the op types it looks at, a ``check`` that returns None
(fire) or a sentence saying why not, and one of two replacements:

* ``target``: the node computes nothing new; its output becomes this existing
  value. Whether that is legal for a graph output is decided by the driver
  *before* anything changes (see :func:`util.rename_blocker`).
* ``rewrite``: builds new nodes (returning the value that replaces the output)
  or rewires the node in place (returning None: the node keeps its output).

Rules only look backwards (at a node and its producers), so one topological
sweep sees every chain already simplified below it: Reshape(Reshape(Reshape(x)))
collapses in one pass. After an in-place rewrite the node is offered to the
rules again (cast pairs, then same-type cast, for instance). The IR is never
changed before a check has passed, and tables compose with ``+``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir import Graph, Model, Node, Value

from .util import Scope, add_constant, constant_array, constant_ints, erase_dead, erase_dead_producers, replace_output

log = logging.getLogger(__name__)

MAX_REWRITES_PER_NODE = 8


@dataclass
class Site:
    """What a rule sees: the node, its graph, and lookups that are O(1) per call."""

    node: Node
    graph: Graph
    scope: Scope
    memo: dict[str, Any] = field(default_factory=dict)  # what a check found, for the replacement to reuse

    def input(self, index: int) -> Value | None:
        inputs = self.node.inputs
        return inputs[index] if index < len(inputs) else None

    def const(self, index: int, max_elements: int = 1 << 16) -> np.ndarray | None:
        return constant_array(self.input(index), self.scope, max_elements)

    def ints(self, index: int) -> list[int] | None:
        return constant_ints(self.input(index), self.scope)

    def ints_or_attr(self, index: int, attr: str) -> list[int] | None:
        """An int list given as input ``index`` (newer opsets) or as attribute ``attr`` (older ones)."""
        if attr in self.node.attrs:
            return [int(v) for v in self.node.attr(attr)]
        return self.ints(index)

    def producer(self, index: int, *op_types: str) -> Node | None:
        """The default-domain producer of input ``index`` if its op type is one of ``op_types``."""
        value = self.input(index)
        node = value.producer if value is not None else None
        if node is None or node.op_type not in op_types or not self.scope.is_opset_op(node):
            return None
        return node

    def at(self, node: Node) -> Site:
        """The same lookups around another node (a producer) of the same graph."""
        return Site(node, node.graph or self.graph, self.scope)

    @property
    def opset(self) -> int:
        return self.scope.opset(self.graph)

    def _name(self, suffix: str) -> str:
        # Prefixed with the node's (unique) output name: fresh_name probes prefix_0, prefix_1, ... in turn,
        # so a prefix shared by thousands of new names would make a sweep quadratic.
        return self.graph.fresh_name(f"{self.node.outputs[0].name or self.node.op_type}_{suffix}")

    def constant(self, array: Any, suffix: str = "const") -> Value:
        """A new constant visible to the node (initializer, or Constant node in a function)."""
        return add_constant(self.graph, np.asarray(array), self.node, self.scope, self._name(suffix))

    def add_node(self, op_type: str, inputs: Sequence[Value | None], attrs: dict | None = None, *,
                 rule: str = "") -> Value:
        """Insert a node before the current one; its output is typed like the current node's."""
        out_name = self._name(op_type.lower())
        new = Node(op_type, inputs, attrs, outputs=[out_name], name=self._name(rule or op_type))
        new.meta["rule"] = rule
        self.graph.insert_before(self.node, new)
        new.outputs[0].type = self.node.outputs[0].type
        return new.outputs[0]


Check = Callable[[Site], str | None]


@dataclass(frozen=True)
class Rule:
    """One named rewrite. Exactly one of ``target`` and ``rewrite`` is set."""

    name: str
    op_types: tuple[str, ...]
    check: Check
    target: Callable[[Site], Value] | None = None
    rewrite: Callable[[Site], Value | None] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if (self.target is None) == (self.rewrite is None):
            raise ValueError(f"rule {self.name}: give exactly one of target and rewrite")


@dataclass(frozen=True)
class Rejection:
    """Why ``rule`` did not fire on ``node`` (the explanation of a near miss)."""

    node: str
    rule: str
    reason: str


@dataclass
class RuleTable:
    """Rules by op type, in the order given (the first that fires wins); ``a + b`` concatenates."""

    rules: list[Rule]
    by_op: dict[str, list[Rule]] = field(init=False)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in {names}")
        self.by_op = {}
        for rule in self.rules:
            for op in rule.op_types:
                self.by_op.setdefault(op, []).append(rule)

    def __add__(self, other: RuleTable) -> RuleTable:
        return RuleTable(self.rules + other.rules)

    def apply(self, model: Model, *, explain: list[Rejection] | None = None) -> Counter[str]:
        """Apply the rules to every graph of ``model``; returns how often each rule fired.

        With ``explain`` (a list), appends why each rule that looked at a node did not fire.
        """
        scope = Scope(model)
        fired: Counter[str] = Counter()
        for graph in scope.graphs:
            if graph.parent is not None and graph.parent.graph is None:
                continue  # the node holding this body was erased earlier in the sweep
            for node in graph:
                rules = self.by_op.get(node.op_type)
                if rules and node.graph is graph and scope.is_opset_op(node):
                    _rewrite_node(node, graph, rules, scope, fired, explain)
        if fired:
            log.debug("rules fired: %s", dict(fired))
        return fired


def _rewrite_node(node: Node, graph: Graph, rules: list[Rule], scope: Scope, fired: Counter[str],
                  explain: list[Rejection] | None) -> None:
    label = node.label() if explain is not None else ""
    rejected: dict[str, str] = {}
    applied: set[str] = set()
    for _ in range(MAX_REWRITES_PER_NODE):
        for rule in rules:
            outcome = _try(rule, Site(node, graph, scope))
            if outcome is None:
                fired[rule.name] += 1
                applied.add(rule.name)
                break
            if explain is not None:
                rejected.setdefault(rule.name, outcome)
        else:
            break  # no rule fires any more
        if node.graph is None:
            break  # replaced and erased
    else:
        log.debug("%s: stopped after %d rewrites", node.label(), MAX_REWRITES_PER_NODE)
    if explain is not None:  # the first reason of each rule that never fired here (on the node as it was)
        explain.extend(Rejection(label, name, why) for name, why in rejected.items() if name not in applied)


def _try(rule: Rule, site: Site) -> str | None:
    """Check and apply one rule; None if it fired, else why not (the IR is then untouched)."""
    node, graph, scope = site.node, site.graph, site.scope
    reason = rule.check(site)
    if reason is not None:
        return reason
    if any(out.has_uses() or scope.is_output(out) for out in node.outputs[1:]):
        return "the node has other live outputs"
    old_inputs = list(node.inputs)
    if rule.target is not None:
        reason = replace_output(node.outputs[0], rule.target(site), graph, scope)
        if reason is not None:
            return reason
    else:
        new = rule.rewrite(site)  # type: ignore[misc] - set when target is not (checked in Rule)
        if new is None:
            node.meta.setdefault("rules", []).append(rule.name)
        elif replace_output(node.outputs[0], new, graph, scope) is not None:
            raise AssertionError(f"rule {rule.name}: a new node's output must be able to take any name")
    erase_dead(node, scope)
    erase_dead_producers(old_inputs, graph, scope)
    return None
