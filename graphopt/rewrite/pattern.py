"""Patterns: data describing a subgraph to find, written with a builder that reads like the subgraph.

    def swish(op, x):
        return op.Mul(x, op.Sigmoid(x), _commute=True)

Calling the function with a :class:`PatternBuilder` and one :class:`Var` per
parameter after ``op`` gives the pattern tree rooted at the Mul (the first value
returned). Returning more values exposes inner results too: their readers outside
the match then read what the replacement returns for them. Attributes are
constraints (a value to equal, or a predicate); ``_commute`` lets a two-input
op match its inputs in either order; :meth:`PatternBuilder.const` matches a
constant (an initializer) with an optional predicate on its array;
:class:`Opt` matches an input that may be missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AttrConstraint = Any  # a value to compare with, or a callable(value) -> bool


class ValuePattern:
    """Something that matches a Value (a node input)."""

    name: str | None = None


@dataclass(eq=False)
class Var(ValuePattern):
    """Any value; the same name must bind the same value everywhere in the pattern."""

    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Const(ValuePattern):
    """A constant (initializer, not overridable as a graph input), optionally with a predicate on its array."""

    name: str | None = None
    where: Callable[[np.ndarray], bool] | None = None

    def __repr__(self) -> str:
        return f"const({self.name or ''})"


@dataclass(eq=False)
class Opt(ValuePattern):
    """An input that may be omitted; when present it must match ``inner`` (bound to None when absent)."""

    inner: ValuePattern

    @property
    def name(self) -> str | None:  # type: ignore[override]
        return self.inner.name


@dataclass(eq=False)
class NodePattern:
    """An op application: type(s), domain, inputs, attribute constraints."""

    op_types: frozenset[str]
    domain: str = ""
    inputs: list[ValuePattern | None] = field(default_factory=list)
    attrs: dict[str, AttrConstraint] = field(default_factory=dict)
    commute: bool = False
    num_outputs: int = 1
    name: str | None = None  # binds the matched Node under this name

    @property
    def label(self) -> str:
        return "|".join(sorted(self.op_types))

    def __repr__(self) -> str:
        return f"{self.label}({', '.join(map(repr, self.inputs))})"


@dataclass(eq=False)
class Out(ValuePattern):
    """Output ``index`` of a node matching ``node``."""

    node: NodePattern
    index: int = 0

    @property
    def name(self) -> str | None:  # type: ignore[override]
        return None

    def __repr__(self) -> str:
        return repr(self.node) if self.index == 0 else f"{self.node!r}[{self.index}]"


class PatternBuilder:
    """``op.Relu(x)`` builds a NodePattern; options are keyword arguments starting with ``_``.

    ``_domain``: the op's domain; ``_commute``: inputs in either order (two inputs);
    ``_outputs``: number of outputs (returns a tuple); ``_name``: bind the node;
    ``_ops``: alternatives, e.g. ``op.Elementwise(x, _ops={"Add", "Sub"})``.
    Every other keyword is an attribute constraint.
    """

    def __getattr__(self, op_type: str) -> Callable[..., Out | tuple[Out, ...]]:
        if op_type.startswith("_"):
            raise AttributeError(op_type)

        def make(*inputs: ValuePattern | None, _domain: str = "", _commute: bool = False, _outputs: int = 1,
                 _name: str | None = None, _ops: Sequence[str] | None = None, **attrs: AttrConstraint):
            node = NodePattern(frozenset(_ops or [op_type]), _domain, list(inputs), attrs, _commute, _outputs, _name)
            outs = tuple(Out(node, i) for i in range(_outputs))
            return outs if _outputs > 1 else outs[0]

        return make

    @staticmethod
    def const(name: str | None = None, where: Callable[[np.ndarray], bool] | None = None) -> Const:
        return Const(name, where)

    @staticmethod
    def opt(inner: ValuePattern) -> Opt:
        return Opt(inner)


def build_pattern(target: Callable[..., Any]) -> tuple[list[Out], list[str]]:
    """Call ``target(op, *vars)``; returns the pattern's outputs and its variable names."""
    params = list(inspect.signature(target).parameters)[1:]
    result = target(PatternBuilder(), *(Var(p) for p in params))
    outputs = list(result) if isinstance(result, tuple) else [result]
    if not outputs or not all(isinstance(o, Out) for o in outputs):
        raise TypeError(f"pattern {target.__name__} must return node outputs built with op.<OpType>(...)")
    inside = _pattern_nodes(outputs[0].node)
    stray = [o for o in outputs if id(o.node) not in inside]
    if stray:
        raise TypeError(f"pattern {target.__name__}: output {stray[0]!r} is not computed inside the pattern rooted "
                        f"at {outputs[0].node!r}")
    return outputs, params


def _pattern_nodes(root: NodePattern) -> set[int]:
    """ids of the node patterns reachable from ``root`` through its inputs."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for value in node.inputs:
            value = value.inner if isinstance(value, Opt) else value
            if isinstance(value, Out):
                stack.append(value.node)
    return seen
