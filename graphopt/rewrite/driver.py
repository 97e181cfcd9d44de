"""Applying rule sets to a fixed point, as a pass, and explaining near-misses."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from ..ir import Model
from ..pipeline import Pass, PassContext, PassResult
from .rule import Rule

log = logging.getLogger(__name__)


class RuleSet:
    """An ordered collection of rules, indexed by anchor op; compose with ``+`` (tinygrad style)."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"duplicate rule names: {sorted(duplicates)}")
        self._by_op: dict[str, list[Rule]] = defaultdict(list)
        for rule in self.rules:
            for op in rule.root_ops:
                self._by_op[op].append(rule)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.rules + other.rules)

    def __iter__(self):
        return iter(self.rules)

    def get(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def apply(self, model: Model, max_sweeps: int = 20) -> Counter[str]:
        """Rewrite every graph (subgraphs and function bodies too) until no rule matches."""
        counts: Counter[str] = Counter()
        for graph in list(model.graphs()):
            for _ in range(max_sweeps):
                changed = 0
                for node in graph:
                    if node.graph is not graph:
                        continue  # erased by an earlier rewrite in this sweep
                    for rule in self._by_op.get(node.op_type, ()):
                        ctx, _ = rule.find(node, model)
                        if ctx is not None:
                            rule.apply(ctx)
                            counts[rule.name] += 1
                            changed += 1
                            break
                if not changed:
                    break
            else:
                log.warning("rewrites in graph %r did not settle in %d sweeps", graph.name, max_sweeps)
        return counts

    def explain(self, model: Model, rule_name: str) -> list[Explanation]:
        """For each candidate anchor of rule ``rule_name``, whether it matches and if not, why."""
        rule = self.get(rule_name)
        if rule is None:
            raise KeyError(rule_name)
        found = []
        for graph in model.graphs():
            for node in graph:
                if node.op_type in rule.root_ops:
                    _, reason = rule.find(node, model)
                    found.append(Explanation(rule.name, graph.name, node.label(), reason))
        return found


@dataclass
class Explanation:
    rule: str
    graph: str
    node: str
    reason: str | None  # None: the rule matches here

    @property
    def matches(self) -> bool:
        return self.reason is None


class RewritePass(Pass):
    """A pass made of rewrite rules: subclasses set ``name``, ``description`` and ``rules``."""

    rules: ClassVar[RuleSet]

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        counts = self.rules.apply(model)
        return PassResult(sum(counts.values()), details={"rules": dict(counts)})
