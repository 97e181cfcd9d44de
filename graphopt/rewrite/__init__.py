"""Declarative rewriting: patterns written like the subgraph they match, rules as data.

    from graphopt.rewrite import Rule, RuleSet, RewritePass

    def target(op, x):
        return op.Mul(x, op.Sigmoid(x), _commute=True)

    def replacement(op, x):
        return op.Swish(x, _domain="my.ops")

    rules = RuleSet([Rule("swish", target, replacement)])
    counts = rules.apply(model)              # Counter of rule name -> rewrites
    rules.explain(model, "swish")            # why each Mul did or did not match
"""

from .driver import Explanation, RewritePass, RuleSet
from .matcher import Match, Matcher
from .pattern import Const, NodePattern, Opt, Out, PatternBuilder, Var
from .rule import RULE_METADATA_KEY, MatchContext, ReplacementBuilder, Rule, RuleError

__all__ = [
    "Const", "Explanation", "Match", "MatchContext", "Matcher", "NodePattern", "Opt", "Out", "PatternBuilder",
    "RULE_METADATA_KEY", "ReplacementBuilder", "RewritePass", "Rule", "RuleError", "RuleSet", "Var",
]
