"""Whole residual branches: a group inside ``x + f(x)`` may go entirely, f becoming a per-channel constant."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.ir import verify
from graphopt.passes.prune import PruneConfig, prune
from graphopt.passes.prune.branches import branch_problem
from tests.helpers import run
from tests.passes.test_prune_groups import conv, group_with, groups_of, model, pruned, weights

RNG = np.random.default_rng(3)


def residual(join: str = "Add", chain: bool = False) -> onnx.ModelProto:
    """c0 -> relu -> [c1 -> relu -> c2] joined back with ``join``, relu, c3. ``chain``: no join, c2 -> c3."""
    parts = [conv("c0", "x", 3, 8), conv("c1", "r0", 8, 8), conv("c2", "r1", 8, 8), conv("c3", "r2", 8, 4)]
    extra = [helper.make_node("Relu", ["c0"], ["r0"]), helper.make_node("Relu", ["c1"], ["r1"])]
    if chain:
        extra.append(helper.make_node("Relu", ["c2"], ["r2"]))
    else:
        extra += [helper.make_node(join, ["c2", "r0"], ["s"]), helper.make_node("Relu", ["s"], ["r2"])]
    return model(parts, "c3", (1, 4, 8, 8), extra_nodes=extra)


def with_zero_weights(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``proto`` with initializer ``name`` zeroed: a conv whose output is then exactly its bias."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    init = next(i for i in out.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), name))
    return out


@pytest.mark.parametrize("join", ["Add", "Mul"])
def test_a_branch_that_cannot_shrink_enough_goes_whole(join):
    proto = residual(join)
    inner = group_with(groups_of(proto), "c1")
    assert inner.branch and not group_with(groups_of(proto), "c0").branch  # the stream feeds the output conv
    # blocks of 8: 8 channels is the least any group keeps, so only removing the branch meets 50 %
    out, report = pruned(proto, flops=0.5, latency=True, round_to=8)
    verify(graphopt.load(out).graph)
    assert "c1.w" not in weights(out) and "c2.w" not in weights(out)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", join, "Relu", "Conv"]
    assert report.macs_kept <= 0.5 and [g.status for g in report.groups if g.id == inner.id] == ["removed"]
    assert any("c2 became constants (their biases)" in note for note in report.notes)
    feeds = {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    expected = run(with_zero_weights(proto, "c2.w"), feeds)[0]  # c2 then outputs its bias everywhere
    np.testing.assert_allclose(run(out, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_with_calibration_data_the_branch_becomes_its_mean_output():
    proto = residual()
    calib = {"x": RNG.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    out, report = pruned(proto, flops=0.5, latency=True, round_to=8, calib=calib)
    assert any("their mean output on the calibration data" in note for note in report.notes)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    exposed.graph.output.append(helper.make_tensor_value_info("c2", onnx.TensorProto.FLOAT, None))
    mean = run(exposed, calib)[1].mean(axis=(0, 2, 3))
    add = next(n for n in out.graph.node if n.op_type == "Add")
    const = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}[add.input[0]]
    np.testing.assert_allclose(const.reshape(-1), mean, rtol=1e-4, atol=1e-5)


def test_a_plain_chain_is_not_a_branch_and_says_why():
    analysis = groups_of(residual(chain=True))
    inner = group_with(analysis, "c1")
    assert not inner.branch
    assert branch_problem(analysis, inner) == "c2's output reaches c3 (Conv), which needs its full shape"
    out, report = pruned(residual(chain=True), flops=0.5, latency=True, round_to=8)
    assert "c1.w" in weights(out) and not any("branches removed" in note for note in report.notes)


def test_a_branch_output_read_twice_stays():
    proto = residual()
    proto.graph.node.append(helper.make_node("ReduceMean", ["c2"], ["m"], keepdims=1))
    proto.graph.output.append(helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None))
    analysis = groups_of(proto)
    assert branch_problem(analysis, group_with(analysis, "c1")) == "c2's output has 2 readers"


@pytest.mark.parametrize("name", ["resnet_torchscript", "resnet_dynamo"])
def test_exported_resnet_drops_a_block_to_meet_half_the_macs_in_16_channel_blocks(zoo, name):
    """AVX-512's 16-channel blocks: whole blocks alone keep 58 % of the small ResNet's MACs (docs/prune.md)."""
    from tests.passes.test_prune_models import outputs_like

    model = graphopt.load(str(zoo.build(name)))
    convs = sum(n.op_type == "Conv" for n in model.graph)
    report = prune(model, PruneConfig(flops=0.5, latency=True, round_to=16))
    verify(model.graph)
    assert 0.45 < report.macs_kept <= 0.5
    assert [g.status for g in report.groups].count("removed") == 1
    assert sum(n.op_type == "Conv" for n in model.graph) == convs - 2  # the branch's two convs
    assert not any(n.op_type == "BatchNormalization" for n in model.graph if n.inputs[0].const is not None)
    outputs_like(zoo, name, model)


@pytest.mark.parametrize("name", ["bert_torchscript", "bert_dynamo"])
def test_exported_bert_attention_and_ffn_blocks_can_go_whole(zoo, name):
    """Heads and FFN widths are branches too (x + attention(x), x + ffn(x)); removing all of them leaves the
    embeddings and the LayerNorms, with the model's interface."""
    from graphopt.passes.prune import analyze
    from graphopt.passes.prune.allocate import pruned_copy
    from graphopt.passes.prune.groups import default_protected
    from graphopt.passes.prune.probe import probe_shapes
    from graphopt.pipeline import PassContext, get_pass
    from tests.passes.test_prune_models import session

    model = graphopt.load(str(zoo.build(name)))
    get_pass("lift-constants").run(model, PassContext())
    proto = graphopt.to_proto(model)
    shapes, protect = probe_shapes(model, proto), default_protected(model)
    branches = [g for g in analyze(model, shapes, protect).groups if g.branch]
    assert len(branches) == 4  # 2 layers x (heads, FFN)
    out = graphopt.load(pruned_copy(proto, shapes, protect, {g.id: 0 for g in branches}))
    verify(out.graph)
    assert not any(n.op_type in ("MatMul", "Softmax") for n in out.graph)
    feeds = zoo.make_inputs(zoo.MODELS[name], second=True, seed=2)
    ref, got = session(str(zoo.build(name))).run(None, feeds), session(graphopt.to_bytes(out)).run(None, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]


def test_a_target_no_set_of_branches_meets_removes_none(zoo):
    model = graphopt.load(str(zoo.build("resnet_dynamo")))
    report = prune(model, PruneConfig(flops=0.05, latency=True, round_to=16))  # the stem alone is 13 %
    assert "removed" not in [g.status for g in report.groups]
    assert any(note.startswith("FLOPs target not reached") for note in report.notes)
