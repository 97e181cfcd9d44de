"""PassManager, registry, plugins and instruments."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir import ArrayTensor, Node
from graphopt.optimize import optimize
from graphopt.pipeline import (
    PassBrokeGraph,
    PassContext,
    PassManager,
    available_passes,
    default_pipeline,
    get_pass,
    model_pass,
    refresh_plugins,
    unregister_pass,
)
from tests.helpers import parse

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    a = Relu(x)
    b = Identity(a)
    y = Sigmoid(b)
}
"""


def test_default_pipeline_is_every_lossless_pass():
    names = default_pipeline()
    assert {"eliminate-dead-nodes", "remove-identity", "remove-unused-initializers", "lift-constants"} <= set(names)
    assert all(available_passes()[n].lossless for n in names)


def test_unknown_pass_lists_the_available_ones():
    with pytest.raises(GraphoptError, match="(?s)unknown pass 'nope'.*remove-identity"):
        get_pass("nope")


def test_fixed_point_and_iteration_cap():
    @model_pass("ping")
    def ping(model, ctx):
        """Always claims a change: a pass that never converges."""
        return 1

    model = graphopt.load(parse(MODEL))
    report = PassManager([ping(), "remove-identity"], PassContext(max_iterations=3)).run(model)
    assert report.iterations == 3 and not report.converged
    assert report.stats["ping"].runs == 3 and report.stats["remove-identity"].changes == 1
    assert ping.description.startswith("Always claims")


def test_disabled_passes_do_not_run():
    model = graphopt.load(parse(MODEL))
    result = optimize(model, disable=["remove-identity"])
    assert "Identity" in [n.op_type for n in model.graph]
    assert "remove-identity" not in result.pipeline.stats


def test_disabling_an_unknown_pass_is_an_error():
    """A misspelt name would otherwise disable nothing without a word."""
    with pytest.raises(GraphoptError, match="cannot disable unknown pass 'remove-identiy'") as err:
        optimize(graphopt.load(parse(MODEL)), disable=["remove-identiy"])
    assert "remove-identity" in str(err.value)  # the hint lists what exists


@model_pass("break-sigmoid")
def break_sigmoid(model, ctx):
    """Replace Sigmoid with Tanh: changes the numbers, keeps the graph well formed."""
    changed = 0
    for node in model.graph:
        if node.op_type == "Sigmoid":
            node.op_type = "Tanh"
            changed += 1
    return changed


@model_pass("break-uses")
def break_uses(model, ctx):
    """Corrupt the use lists, as a pass that bypasses the API would."""
    node = next(iter(model.graph))
    node.inputs[0]._uses.clear()
    return 1


def test_verify_each_names_the_pass_that_changes_outputs():
    model = graphopt.load(parse(MODEL))
    with pytest.raises(PassBrokeGraph, match="'break-sigmoid' changed the model's outputs") as err:
        optimize(model, ["remove-identity", break_sigmoid()], verify_each=True)
    assert err.value.pass_name == "break-sigmoid"
    assert not err.value.report.ok


def test_ir_check_names_the_pass_that_breaks_the_ir():
    model = graphopt.load(parse(MODEL))
    with pytest.raises(PassBrokeGraph, match="'break-uses' left the graph ill-formed"):
        PassManager([break_uses()]).run(model)  # the autouse fixture checks every pass


def test_plugin_pass_found_through_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "graphopt_demo_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        import numpy as np
        from graphopt.ir import ArrayTensor
        from graphopt.pipeline import Pass, PassResult

        class TagWeights(Pass):
            name = "tag-weights"
            description = "Add a marker initializer (demo plugin)"

            def run(self, model, ctx):
                if "plugin_was_here" in model.graph.initializers:
                    return PassResult(0)
                model.graph.add_initializer(ArrayTensor(np.zeros(1, np.float32), "plugin_was_here"))
                return PassResult(1)
    '''))
    dist = tmp_path / "graphopt_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\ntag-weights = graphopt_demo_plugin:TagWeights\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_plugins()
    try:
        assert "tag-weights" in available_passes()
        model = graphopt.load(parse(MODEL))
        optimize(model, ["tag-weights", "remove-identity"])
        assert "plugin_was_here" in model.graph.initializers
    finally:
        unregister_pass("tag-weights")
        sys.modules.pop("graphopt_demo_plugin", None)


def test_pass_can_build_nodes_through_the_api():
    @model_pass("double-relu")
    def double(model, ctx):
        graph = model.graph
        relu = next(n for n in graph if n.op_type == "Relu")
        if any(n.op_type == "Mul" for n in graph):
            return 0
        two = graph.add_initializer(ArrayTensor(np.float32(2.0), graph.fresh_name("two")))
        mul = Node("Mul", [relu.outputs[0], two])
        mul.outputs[0].name = graph.fresh_name("doubled")
        graph.insert_after(relu, mul)
        for user, index in relu.outputs[0].uses():
            if user is not mul:
                user.set_input(index, mul.outputs[0])
        return 1

    model = graphopt.load(parse(MODEL))
    optimize(model, [double()])
    assert [n.op_type for n in model.graph] == ["Relu", "Mul", "Identity", "Sigmoid"]
