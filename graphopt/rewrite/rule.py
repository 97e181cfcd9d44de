"""A rewrite rule: name + pattern + condition + replacement, and how a match is applied.

Nothing in the IR changes until a match is confirmed and the replacement built
(MLIR's rule). A rule whose replacement is wrong (wrong number of values, a
value from nowhere) raises RuleError naming the rule, before touching the graph.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import GraphoptError
from ..ir import ArrayTensor, Graph, Model, Node, TensorType, Value, ValueType
from .matcher import Match, Matcher
from .pattern import build_pattern

RULE_METADATA_KEY = "graphopt.rule"


class RuleError(GraphoptError):
    """A bug in a rewrite rule (not in the user's model)."""


@dataclass
class MatchContext:
    """What a condition or replacement may look at besides the bindings. ``extra``: the bindings a
    condition computed (it returned a dict), passed to the replacement by name."""

    model: Model
    graph: Graph
    match: Match
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Node:
        return self.match.root


class ReplacementBuilder:
    """``op.Gemm(a, b, transB=1)`` creates a node (not yet in the graph) and returns its output(s).

    Options: ``_domain``, ``_outputs`` (number of outputs; returns a tuple), ``_version``
    (opset version to import for a new domain), ``_name`` (the node's name: a rebuilt node keeps the name of
    the matched one it replaces, which is erased), ``_type`` (the output's type: a ValueType, or a Value
    whose type to copy; a sequence of those for several outputs), so later rules in the same sweep can
    read shapes without another round of shape inference. ``op.const(array)`` makes an initializer.
    """

    def __init__(self, rule: str, graph: Graph) -> None:
        self._rule, self._graph = rule, graph
        self.nodes: list[Node] = []
        self.constants: list[Value] = []
        self.domains: dict[str, int] = {}

    def __getattr__(self, op_type: str) -> Callable[..., Value | tuple[Value, ...]]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: Value | None, _domain: str = "", _outputs: int = 1, _version: int = 1,
                 _type: Any = None, _name: str | None = None, **attrs: Any):
            for i, value in enumerate(inputs):
                if value is not None and not isinstance(value, Value):
                    raise RuleError(f"rule {self._rule!r}: input {i} of {op_type} is {value!r}, not a Value "
                                    "(use op.const(array) for constants)")
            names = [self._graph.fresh_name(f"{self._rule}/{op_type}") for _ in range(_outputs)]
            node = Node(op_type, inputs, attrs, outputs=names, domain=_domain,
                        name=_name or self._graph.fresh_name(f"{self._rule}/{op_type}_node"))
            node.metadata[RULE_METADATA_KEY] = self._rule
            if _type is not None:
                self._set_types(op_type, node.outputs, _type)
            if _domain not in ("", "ai.onnx"):
                self.domains[_domain] = _version
            self.nodes.append(node)
            return node.outputs if _outputs > 1 else node.outputs[0]

        return make

    def _set_types(self, op_type: str, outputs: list[Value], types: Any) -> None:
        many = isinstance(types, list | tuple)
        if many != (len(outputs) > 1) or (many and len(types) != len(outputs)):
            raise RuleError(f"rule {self._rule!r}: _type of {op_type} must give one type per output "
                            f"({len(outputs)}), got {types!r}")
        for out, type_ in zip(outputs, types if many else [types], strict=True):
            if isinstance(type_, Value):
                type_ = type_.type
            if type_ is not None and not isinstance(type_, ValueType):
                raise RuleError(f"rule {self._rule!r}: _type of {op_type} is {type_!r}, not a type or a Value")
            out.type = type_

    def const(self, array: np.ndarray | float | int, name: str | None = None) -> Value:
        tensor = ArrayTensor(np.asarray(array))
        value = Value(self._graph.fresh_name(name or f"{self._rule}/const"), const=tensor)
        value.type = TensorType(tensor.elem_type, tensor.shape)
        tensor.name = value.name
        self.constants.append(value)
        return value


def _call_with(fn: Callable[..., Any], first: Any, bindings: dict[str, Any]) -> Any:
    """Call ``fn(first, **bindings)`` passing only the names it declares (unless it takes **kwargs)."""
    any_keyword, names = _parameters(fn)
    if any_keyword:
        return fn(first, **bindings)
    return fn(first, **{k: bindings.get(k) for k in names})


@functools.lru_cache(maxsize=4096)
def _parameters(fn: Callable[..., Any]) -> tuple[bool, tuple[str, ...]]:
    """Whether ``fn`` takes **kwargs, and its parameter names after the first (inspect.signature costs
    ~20 us: it was seconds of a 200k-node pipeline, called for every condition and replacement)."""
    params = inspect.signature(fn).parameters
    return any(p.kind is p.VAR_KEYWORD for p in params.values()), tuple(params)[1:]


@dataclass
class Rule:
    """``target(op, *vars)`` builds the pattern; ``condition(ctx, **bindings)`` returns True/None to
    accept, a dict to accept with extra bindings for the replacement (what it computed to decide), or
    False / a reason string to refuse; ``replacement(op, **bindings)`` builds the new nodes and returns
    the value(s) that replace the pattern's output(s)."""

    name: str
    target: Callable[..., Any]
    replacement: Callable[..., Any]
    condition: Callable[..., bool | str | None] | None = None
    matcher: Matcher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        outputs, _ = build_pattern(self.target)
        self.matcher = Matcher(outputs)

    @property
    def root_ops(self) -> frozenset[str]:
        return self.matcher.root.op_types

    def find(self, node: Node, model: Model) -> tuple[MatchContext | None, str | None]:
        """Match at ``node`` and check the condition: (context, None) or (None, why not)."""
        match = self.matcher.match(node)
        if match is None:
            return None, self.matcher.failure or "no match"
        ctx = MatchContext(model, node.graph, match)
        if self.condition is not None:
            verdict = _call_with(self.condition, ctx, match.bindings)
            if verdict is False or isinstance(verdict, str):
                return None, f"condition: {verdict if isinstance(verdict, str) else 'returned False'}"
            if isinstance(verdict, dict):
                clash = sorted(set(verdict) & (set(match.bindings) | {"ctx"}))
                if clash:
                    raise RuleError(f"rule {self.name!r}: the condition's bindings {clash} are already bound "
                                    "by the pattern")
                ctx.extra = verdict
            elif verdict not in (True, None):
                raise RuleError(f"rule {self.name!r}: the condition returned {verdict!r}; expected True, None, "
                                "False, a reason string or a dict of extra bindings")
        return ctx, None

    def apply(self, ctx: MatchContext) -> None:
        """Build the replacement, check it, then splice it in and remove the matched nodes."""
        graph, match = ctx.graph, ctx.match
        builder = ReplacementBuilder(self.name, graph)
        try:
            result = _call_with(self.replacement, builder, {**match.bindings, **ctx.extra, "ctx": ctx})
            new_values = list(result) if isinstance(result, tuple | list) else [result]
            self._check(builder, new_values, match)
        except BaseException:
            for node in builder.nodes:  # built nodes already registered uses: take them back
                node.set_inputs([])
            raise
        for value in builder.constants:
            graph.add_initializer(value)
        for node in builder.nodes:
            graph.insert_before(match.root, node)
        for domain, version in builder.domains.items():
            ctx.model.opset_imports.setdefault(domain, version)
        fresh = {id(o) for n in builder.nodes for o in n.outputs}
        matched = {id(n) for n in match.nodes}
        # an exposed inner value's readers may sit before the root, where the new nodes went in
        reorder = any(id(user) not in matched for old in match.outputs if old.producer is not match.root
                      for user in old.users())
        renames = []
        for old, new in zip(match.outputs, new_values, strict=True):
            if old.is_graph_output():
                if id(new) not in fresh:
                    new = _identity(graph, match.root, new)  # the interface name must stay on a node output
                renames.append((new, old.name, old.type))
            old.replace_all_uses_with(new, include_graph_outputs=True)
        _erase_dead(graph, match.nodes)
        _inherit_names(builder.nodes, match.nodes)
        for new, name, type_ in renames:
            new.name, new.type = name, type_ or new.type
        if reorder:
            graph.toposort()

    def _check(self, builder: ReplacementBuilder, values: list[Any], match: Match) -> None:
        if len(values) != len(match.outputs):
            raise RuleError(f"rule {self.name!r}: the replacement returned {len(values)} value(s) for "
                            f"{len(match.outputs)} pattern output(s)")
        made = {id(o) for n in builder.nodes for o in n.outputs} | {id(c) for c in builder.constants}
        matched = {id(n) for n in match.nodes}
        for value in values:
            if not isinstance(value, Value):
                raise RuleError(f"rule {self.name!r}: the replacement returned {value!r}, not a Value")
        for node in builder.nodes:
            for value in node.inputs:
                if value is None or id(value) in made:
                    continue
                if value.graph is None or (value.producer is not None and id(value.producer) in matched):
                    raise RuleError(f"rule {self.name!r}: new node {node.op_type} reads {value.name!r}, which is "
                                    "not defined after the rewrite (dangling)")


def _identity(graph: Graph, anchor: Node, value: Value) -> Value:
    node = Node("Identity", [value], outputs=[graph.fresh_name(f"{value.name}/out")])
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _inherit_names(built: list[Node], matched: list[Node]) -> None:
    """A new node takes the name of the erased matched node of its op type when each side has exactly one:
    the Conv that absorbed a BatchNormalization is still the layer users name (``--exclude``, profiles)."""
    def by_op(nodes: list[Node]) -> dict[tuple[str, str], list[Node]]:
        groups: dict[tuple[str, str], list[Node]] = {}
        for node in nodes:
            groups.setdefault((node.domain or "", node.op_type), []).append(node)
        return groups

    erased = by_op([n for n in matched if n.graph is None])
    for key, new in by_op(built).items():
        if len(new) == 1 and len(erased.get(key, ())) == 1 and erased[key][0].name:
            new[0].name = erased[key][0].name


def _erase_dead(graph: Graph, nodes: list[Node]) -> None:
    """Erase matched nodes whose outputs are no longer used, consumers before producers."""
    pending = [n for n in nodes if n.graph is graph]
    progress = True
    while pending and progress:
        progress = False
        for node in list(pending):
            if not any(o.has_uses() or o.is_graph_output() for o in node.outputs):
                graph.erase(node)
                pending.remove(node)
                progress = True
