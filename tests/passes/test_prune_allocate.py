"""Latency-driven allocation (``--allocate latency``): the greedy follows the measured time, and the real
measure times pruned copies in onnxruntime."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.passes.prune import analyze
from graphopt.passes.prune.allocate import allocate_latency, onnxruntime_measure
from graphopt.passes.prune.cost import model_cost
from graphopt.passes.prune.groups import default_protected
from graphopt.passes.prune.plan import group_steps, removed_counts
from graphopt.passes.prune.probe import probe_inputs, probe_shapes
from graphopt.pipeline import PassContext, get_pass


@pytest.fixture(scope="module")
def resnet(zoo):
    model = graphopt.load(str(zoo.build("resnet_dynamo")))
    get_pass("lift-constants").run(model, PassContext())
    proto = graphopt.to_proto(model)
    shapes = probe_shapes(model, proto)
    protect = default_protected(model)
    analysis = analyze(model, shapes, protect)
    return proto, shapes, protect, analysis, [g for g in analysis.groups if g.prunable]


@pytest.mark.parametrize("slow_group", [0, -1])
def test_allocation_cuts_where_the_measured_time_goes(resnet, slow_group):
    _, _, _, analysis, groups = resnet
    assert len(groups) >= 3
    slow = groups[slow_group]

    def measure(plans):  # only the slow group's channels cost time
        return [p[slow.id] / slow.n for p in plans]

    plan = allocate_latency(analysis, groups, 0.5, 8, 4, measure)
    total = model_cost(analysis, {})[0]
    assert plan.macs <= 0.5 * total and plan.macs == model_cost(analysis, removed_counts(analysis, plan.keep))[0]
    steps = group_steps(analysis, groups, 8, 4)
    for g in groups:
        assert plan.keep[g.id] in steps[g.id] + [g.n]
    assert plan.keep[slow.id] == 8  # cut to the bone first, never given back
    assert all(plan.keep[g.id] > 0 for g in groups)  # whole blocks fit the budget: no branch goes whole
    assert plan.macs > 0.45 * total  # the rest of the budget went back to the groups that cost no time


def test_allocation_removes_a_branch_only_when_blocks_cannot_fit(resnet):
    _, _, _, analysis, groups = resnet
    slow = groups[-1]  # a stream, not a branch

    def measure(plans):
        return [p[slow.id] / slow.n for p in plans]

    plan = allocate_latency(analysis, groups, 0.5, 16, 4, measure)  # 16-channel blocks alone keep 58 %
    assert plan.macs <= 0.5 * model_cost(analysis, {})[0]
    assert [g.branch for g in groups if plan.keep[g.id] == 0] == [True]


def test_onnxruntime_measure_times_pruned_copies(resnet):
    proto, shapes, protect, _, groups = resnet
    measure = onnxruntime_measure(proto, shapes, protect, probe_inputs(proto)[0], seconds=0.2, min_rounds=30)
    full, smallest = {g.id: g.n for g in groups}, {g.id: 8 for g in groups}
    times = measure([full, smallest])
    assert times[0] == 1.0 and 0.0 < times[1] < 0.95  # a third of the MACs: ~0.6x when measured at length
