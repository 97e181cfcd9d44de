"""How many atoms each group keeps: a per-layer ratio, or the ratio that meets a global MAC budget.

The ratio is uniform over prunable groups (torch-pruning's default "local"
pruning), which keeps the comparison with it apples to apples; for a FLOPs
target the ratio is found by bisection on the cost model, since rounding and
groups of different cost make the MACs a step function of the ratio.

Latency-aware counts (``PruneConfig.latency``) follow onnxruntime's CPU conv
kernels (MLAS NCHWc): channels are laid out in blocks of 8 floats (AVX2; 16
with AVX-512) and a count that is not a multiple of the block leaves the fast
blocked path; output channels are computed in *sets* of up to 4 blocks, each
set one pass over the input, so 40 channels (a set of 4 blocks and one of 1)
cost nearly what 64 do. Measured on the small ResNet at batch 1: counts
8/16/16/40/40 run in about 0.70x of the unpruned time, 8/16/16/32/32 in about
0.65x (docs/prune.md). With AVX-512's blocks of 16 the coarsest such plan keeps
58 % of that net's MACs; ``drop_branches_to_fit`` then removes whole residual
branches (``branches.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from .cost import model_cost
from .groups import Analysis, ChannelGroup, DimKey

log = logging.getLogger(__name__)


#: Output-channel blocks one MLAS NCHWc conv pass computes (its filter set).
FILTER_SET = 4


def cpu_block() -> int:
    """Channels per NCHWc block in onnxruntime's CPU kernels on this machine: 16 with AVX-512F, else 8."""
    try:  # numpy's CPU feature table: the same CPUID bits MLAS dispatches on
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # a numpy without it: the AVX2 block
        return 8
    return 16 if __cpu_features__.get("AVX512F") else 8


def keep_count(n: int, ratio: float, round_to: int = 1, width: float = 1.0, set_size: int = 1) -> int:
    """Atoms kept out of ``n`` at ``ratio``; the kept *channels* (atoms x width) round down to a
    multiple of ``round_to`` as torch-pruning does, but never below one multiple nor one atom.
    With ``set_size``, counts above ``set_size`` multiples round down to multiples of ``set_size``
    multiples (whole filter sets, see the module docstring)."""
    kept = math.floor(n * (1.0 - ratio) + 1e-9)
    w = int(round(width)) if abs(width - round(width)) < 1e-9 and width >= 1 else 1
    step, set_step = (m // math.gcd(m, w) for m in (round_to, round_to * set_size))  # in atoms of w channels
    if set_step > 1:
        unit = set_step if kept > set_step else step
        kept -= kept % unit
        kept = max(kept, step)
    return int(min(max(kept, 1), n))


@dataclass
class Plan:
    ratio: float
    keep: dict[int, int]  # group id -> atoms kept
    macs: float
    params: float


def removed_counts(analysis: Analysis, keep: dict[int, int]) -> dict[DimKey, float]:
    """Elements removed per dim when each group keeps ``keep[id]`` atoms (any which ones)."""
    removed: dict[DimKey, float] = {}
    for group in analysis.groups:
        drop = group.n - keep.get(group.id, group.n)
        if drop <= 0:
            continue
        for key in group.dims:
            removed[key] = removed.get(key, 0.0) + drop * group.width(key)
    return removed


def plan_ratio(analysis: Analysis, groups: list[ChannelGroup], ratio: float, round_to: int,
               set_size: int = 1) -> Plan:
    keep = {g.id: keep_count(g.n, ratio, round_to, g.width(g.primary_dim(analysis)), set_size) for g in groups}
    macs, params = model_cost(analysis, removed_counts(analysis, keep))
    return Plan(ratio, keep, macs, params)


def plan_flops(analysis: Analysis, groups: list[ChannelGroup], target: float, round_to: int,
               max_ratio: float = 0.95, set_size: int = 1) -> Plan:
    """The smallest uniform ratio whose plan keeps at most ``target`` of the original MACs."""
    total, _ = model_cost(analysis, {})
    budget = target * total
    best = plan_ratio(analysis, groups, max_ratio, round_to, set_size)
    if best.macs > budget:
        log.info("a uniform ratio cannot reach %.2f of the MACs: at ratio %.2f %.1f%% remain", target, max_ratio,
                 100 * best.macs / max(total, 1))
        return best
    low, high = 0.0, max_ratio
    for _ in range(40):
        mid = (low + high) / 2
        plan = plan_ratio(analysis, groups, mid, round_to, set_size)
        if plan.macs <= budget:
            high, best = mid, plan
        else:
            low = mid
        if high - low < 1e-4:
            break
    return best


def fill_budget(analysis: Analysis, groups: list[ChannelGroup], plan: Plan, target: float, round_to: int,
                set_size: int) -> Plan:
    """Spend what coarse counts left of the MAC budget: raise the most pruned group whose next allowed count
    still fits, one step at a time (whole filter sets leave up to a set per group unspent: on the digits CNN
    the uniform plan kept 37 % of the MACs for a 50 % target)."""
    budget = target * model_cost(analysis, {})[0]
    keep = dict(plan.keep)
    steps = group_steps(analysis, groups, round_to, set_size)
    while True:
        for group in sorted(groups, key=lambda g: (keep[g.id] / g.n, g.id)):
            up = next((c for c in steps[group.id] if c > keep[group.id]), None)
            if up is None:
                continue
            trial = {**keep, group.id: up}
            macs, params = model_cost(analysis, removed_counts(analysis, trial))
            if macs <= budget:
                keep, plan = trial, Plan(plan.ratio, trial, macs, params)
                break
        else:
            return plan


def allowed_counts(n: int, round_to: int, width: float, set_size: int, branch: bool = False) -> list[int]:
    """The atom counts ``keep_count`` can give for a group of ``n``, ascending; 0 first for a ``branch`` group
    (one that may go whole, ``branches.py``)."""
    counts = sorted({keep_count(n, 1.0 - c / n, round_to, width, set_size) for c in range(1, n + 1)})
    return [0, *counts] if branch else counts


def group_steps(analysis: Analysis, groups: list[ChannelGroup], round_to: int, set_size: int) -> dict[int, list[int]]:
    """Per group id, its allowed counts (``allowed_counts``)."""
    return {g.id: allowed_counts(g.n, round_to, g.width(g.primary_dim(analysis)), set_size, g.branch) for g in groups}


def coarsest(steps: dict[int, list[int]]) -> dict[int, int]:
    """Per group id, its smallest allowed count that keeps something (whole blocks, no branch removed)."""
    return {gid: next(c for c in counts if c > 0) for gid, counts in steps.items()}


def allocation_steps(analysis: Analysis, groups: list[ChannelGroup], target: float, round_to: int,
                     set_size: int) -> dict[int, list[int]]:
    """``group_steps`` for a per-group allocation: 0 (a whole branch) only when the coarsest counts of whole
    blocks keep more than ``target`` of the MACs (removing a branch is the lossiest cut; allocate.py)."""
    steps = group_steps(analysis, groups, round_to, set_size)
    total = model_cost(analysis, {})[0]
    if model_cost(analysis, removed_counts(analysis, coarsest(steps)))[0] <= target * total:
        return {gid: [c for c in counts if c > 0] for gid, counts in steps.items()}
    return steps


def drop_branches_to_fit(analysis: Analysis, groups: list[ChannelGroup], plan: Plan, target: float, round_to: int,
                         set_size: int, max_tries: int = 4096, max_fills: int = 8) -> Plan:
    """When whole blocks cannot meet the MAC budget, remove whole residual branches too: the fewest that let the
    coarsest counts of the other groups fit, then ``fill_budget``; of the ways to do that (up to ``max_tries``
    sets tried, the ``max_fills`` keeping the most MACs filled), the one keeping the most MACs. Returns ``plan``
    unchanged when it already fits or even removing every branch would not."""
    budget = target * model_cost(analysis, {})[0]
    branches = [g for g in groups if g.branch]
    if plan.macs <= budget or not branches:
        return plan
    floor = coarsest(group_steps(analysis, groups, round_to, set_size))

    def cost(dropped) -> tuple[float, float, dict[int, int]]:
        keep = {**floor, **{g.id: 0 for g in dropped}}
        return (*model_cost(analysis, removed_counts(analysis, keep)), keep)

    base = cost(())[0]
    saved = {g.id: base - cost((g,))[0] for g in branches}
    largest_first = sorted(branches, key=lambda g: -saved[g.id])
    fewest = next((k for k in range(1, len(branches) + 1) if cost(largest_first[:k])[0] <= budget), None)
    if fewest is None:
        return plan
    fitting = [c for c in (cost(d) for d in itertools.islice(itertools.combinations(branches, fewest), max_tries))
               if c[0] <= budget]
    fitting.sort(key=lambda c: -c[0])
    filled = [fill_budget(analysis, groups, Plan(plan.ratio, keep, macs, params), target, round_to, set_size)
              for macs, params, keep in fitting[:max_fills]]
    best = max(filled, key=lambda p: p.macs)
    log.info("whole branches removed to meet %.2f of the MACs: %s", target,
             sorted(gid for gid, c in best.keep.items() if c == 0))
    return best


def choose(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the atoms to remove: the lowest scores (stable sort, so ties break deterministically)."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[: len(scores) - keep])
