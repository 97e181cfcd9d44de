"""Latency-driven channel counts: cut where onnxruntime saves the most time per MAC removed.

A uniform ratio spends the MAC cut evenly, but onnxruntime's CPU time is not
proportional to MACs: small convs are bound by per-node costs, output channels
within one filter set are nearly free while input channels are not, and
high-resolution convs run at a better MAC rate than low-resolution ones
(docs/prune.md). So instead of a model of those costs, the time is measured:

* down: from the unpruned counts, every group's next allowed lower count is
  timed against the current plan, and the step saving the most time per MAC
  removed is taken, until the MACs fit the budget (for a fixed MAC cut this
  greedy order maximizes the time saved, as in a fractional knapsack);
* up: while a group's next higher count still fits, the step costing the least
  time per MAC given back is taken (the budget is spent on accuracy where it
  is cheapest in time).

Allowed counts are the ``--latency`` ones (whole NCHWc blocks, whole filter
sets above 4 blocks), and 0 for a group whose residual branch may go whole
(``branches.py``) when whole blocks alone cannot meet the budget: removing a
branch is the lossiest step, and timed for speed alone the greedy takes it
first (the small ResNet's highest-resolution block: agreement 0.78 against
0.95, at about the same speed as ``--latency``). ``measure`` returns, for a
list of plans timed together, each plan's time relative to the first; tests
pass a deterministic function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

import graphopt
from graphopt.pipeline import PassContext, get_pass

from .apply import apply_removal, kept_indices
from .branches import drop_branches
from .cost import model_cost
from .groups import Analysis, ChannelGroup, analyze
from .plan import Plan, allocation_steps, removed_counts
from .probe import ShapeTable

log = logging.getLogger(__name__)

Keep = Mapping[int, int]  # group id -> atoms kept
Measure = Callable[[Sequence[Keep]], Sequence[float]]  # each plan's time relative to the first plan's


def allocate_latency(analysis: Analysis, groups: list[ChannelGroup], target: float, round_to: int, set_size: int,
                     measure: Measure) -> Plan:
    """Counts keeping at most ``target`` of the MACs, chosen by measured time per MAC (module docstring)."""
    total = model_cost(analysis, {})[0]
    budget = target * total
    steps = allocation_steps(analysis, groups, target, round_to, set_size)

    def macs(keep: Keep) -> float:
        return model_cost(analysis, removed_counts(analysis, keep))[0]

    keep = {g.id: g.n for g in groups}
    while macs(keep) > budget:
        downs = [{**keep, g.id: max(c for c in steps[g.id] if c < keep[g.id])}
                 for g in groups if steps[g.id][0] < keep[g.id]]
        if not downs:
            break
        keep = _best(keep, downs, measure, macs)
    while True:
        ups = [up for g in groups if (c := next((c for c in steps[g.id] if c > keep[g.id]), None)) is not None
               and macs(up := {**keep, g.id: c}) <= budget]
        if not ups:
            break
        keep = _best(keep, ups, measure, macs)
    kept_atoms = sum(keep.values()) / max(sum(g.n for g in groups), 1)
    macs1, params1 = model_cost(analysis, removed_counts(analysis, keep))
    log.info("latency allocation: %s, %.1f%% of the MACs", keep, 100 * macs1 / max(total, 1))
    return Plan(1.0 - kept_atoms, keep, macs1, params1)


def _best(keep: Keep, candidates: list[dict[int, int]], measure: Measure, macs: Callable[[Keep], float]) -> dict:
    """The candidate with the lowest time change per MAC changed: going down, the most time saved per MAC
    removed; going up, the least time added per MAC given back. Ties go to the first candidate (groups in id
    order), so a fake timing gives a fixed answer."""
    times = list(measure([keep, *candidates]))
    base = macs(keep)
    best = min(range(len(candidates)),
               key=lambda i: ((times[i + 1] - times[0]) / max(abs(macs(candidates[i]) - base), 1.0), i))
    log.debug("latency allocation step %s: times %s", candidates[best], [round(t, 3) for t in times])
    return candidates[best]


def pruned_copy(proto: onnx.ModelProto, shapes: ShapeTable, protect: Sequence[str], keep: Keep) -> bytes:
    """``proto`` with each group cut to ``keep[id]`` atoms (the first ones: for timing, only the counts matter)."""
    model = graphopt.load(proto)
    analysis = analyze(model, shapes, protect)
    removal = {g.id: np.arange(g.n - keep[g.id]) for g in analysis.groups if keep.get(g.id, g.n) < g.n}
    kept = kept_indices(analysis, removal)
    apply_removal(analysis, kept)
    drop_branches(model, analysis, [g for g in analysis.groups if keep.get(g.id) == 0], kept)
    for name in ("eliminate-dead-nodes", "remove-unused-initializers"):
        get_pass(name).run(model, PassContext())
    return graphopt.to_bytes(model)


def onnxruntime_measure(proto: onnx.ModelProto, shapes: ShapeTable, protect: Sequence[str],
                        feed: Mapping[str, np.ndarray], seconds: float = 1.0, min_rounds: int = 10) -> Measure:
    """A ``Measure`` timing pruned copies of ``proto`` in onnxruntime CPU, all plans of one call interleaved in
    rotated order for about ``seconds``; each plan's time is the median over rounds of its ratio to the first
    plan's in that round."""
    from graphopt.passes.quant.evaluate import session
    from graphopt.timing import interleaved_ratios

    sessions: dict[tuple, object] = {}

    def compiled(keep: Keep):
        key = tuple(sorted(keep.items()))
        if key not in sessions:
            sessions[key] = session(pruned_copy(proto, shapes, protect, keep))
        return sessions[key]

    def measure(plans: Sequence[Keep]) -> list[float]:
        return interleaved_ratios([compiled(p) for p in plans], feed, seconds, min_rounds, warmup=1)[0]

    return measure
