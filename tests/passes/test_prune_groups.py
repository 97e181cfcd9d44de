"""Channel dependency analysis on hand-built graphs, one coupling case each, and the pruned graphs in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.ir import verify
from graphopt.passes.prune import PruneConfig, analyze, prune
from graphopt.passes.prune.probe import probe_shapes
from tests.helpers import run

RNG = np.random.default_rng(0)


def conv(name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True):
    """A Conv node and its initializers (same padding)."""
    inits = [numpy_helper.from_array(RNG.standard_normal((cout, cin // group, k, k)).astype(np.float32), f"{name}.w")]
    inputs = [x, f"{name}.w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(cout).astype(np.float32), f"{name}.b"))
        inputs.append(f"{name}.b")
    node = helper.make_node("Conv", inputs, [name], name=name, pads=[k // 2] * 4, group=group)
    return [node], inits


def model(parts, output: str, out_shape, in_shape=(1, 3, 8, 8), extra_nodes=(), opset: int = 17) -> onnx.ModelProto:
    nodes, inits = [], []
    for n, i in parts:
        nodes += n
        inits += i
    graph = helper.make_graph(_toposorted(nodes + list(extra_nodes), {"x"} | {i.name for i in inits}), "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_shape[1:]])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *out_shape[1:]])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def _toposorted(nodes, known: set[str]) -> list:
    out, todo = [], list(nodes)
    while todo:
        ready = next(n for n in todo if all(i in known or not i for i in n.input))
        todo.remove(ready)
        out.append(ready)
        known.update(ready.output)
    return out


def groups_of(proto: onnx.ModelProto, protect=()):
    m = graphopt.load(proto)
    return analyze(m, probe_shapes(m, proto), protect)


def group_with(analysis, producer: str):
    return next(g for g in analysis.groups if producer in g.producers)


def pruned(proto: onnx.ModelProto, **kw):
    """Prune a copy (no default protection unless asked), check the IR, and compare the interface in onnxruntime."""
    m = graphopt.load(proto)
    kw.setdefault("default_protect", False)
    report = prune(m, PruneConfig(**kw))
    verify(m.graph)
    out = onnx.load_from_string(graphopt.to_bytes(m))
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    feeds = {"x": RNG.standard_normal((2, *[d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:]))
             .astype(np.float32)}
    before, after = run(proto, feeds), run(out, feeds)
    assert [a.shape for a in before] == [b.shape for b in after]
    return out, report


def weights(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


def node(proto: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in proto.graph.node if n.name == name)


def test_residual_add_couples_both_branches():
    parts = [conv("c0", "x", 3, 8), conv("c1", "r0", 8, 8), conv("c2", "r1", 8, 8), conv("c3", "r2", 8, 4)]
    extra = [helper.make_node("Relu", ["c0"], ["r0"]), helper.make_node("Add", ["c1", "r0"], ["s"]),
             helper.make_node("Relu", ["s"], ["r1"]), helper.make_node("Relu", ["c2"], ["r2"])]
    proto = model(parts, "c3", (1, 4, 8, 8), extra_nodes=extra)
    stream = group_with(groups_of(proto), "c0")
    assert set(stream.producers) == {"c0", "c1"} and stream.n == 8 and stream.prunable
    out, report = pruned(proto, ratio=0.5)
    w = weights(out)
    assert w["c0.w"] == (4, 3, 3, 3) and w["c1.w"] == (4, 4, 3, 3) and w["c2.w"] == (4, 4, 3, 3)
    assert w["c3.w"] == (4, 4, 3, 3)  # output channels are the model's interface
    assert report.macs_after < report.macs_before


def test_concat_offsets_keep_branches_apart():
    parts = [conv("a", "x", 3, 4), conv("b", "x", 3, 6), conv("c", "cat", 10, 5)]
    proto = model(parts, "c", (1, 5, 8, 8), extra_nodes=[helper.make_node("Concat", ["a", "b"], ["cat"], axis=1)])
    an = groups_of(proto)
    ga, gb = group_with(an, "a"), group_with(an, "b")
    assert ga.id != gb.id and (ga.n, gb.n) == (4, 6)
    assert list(ga.pos[("c.w", 1)] >= 0) == [True] * 4 + [False] * 6  # the consumer's first 4 inputs are a's
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["c.w"] == (5, 2 + 3, 3, 3)


def test_depthwise_couples_input_and_output():
    parts = [conv("c0", "x", 3, 8), conv("dw", "c0", 8, 8, group=8), conv("c2", "dw", 8, 4, k=1)]
    proto = model(parts, "c2", (1, 4, 8, 8))
    g = group_with(groups_of(proto), "c0")
    assert "dw" in g.producers and g.n == 8
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["dw.w"] == (4, 1, 3, 3)
    assert helper.get_attribute_value(next(a for a in node(out, "dw").attribute if a.name == "group")) == 4


def test_grouped_conv_prunes_every_group_alike():
    parts = [conv("c0", "x", 3, 8), conv("g", "c0", 8, 8, group=2), conv("c2", "g", 8, 4, k=1)]
    proto = model(parts, "c2", (1, 4, 8, 8))
    an = groups_of(proto)
    assert group_with(an, "c0").n == 4  # channel k of both groups goes together
    out, _ = pruned(proto, ratio=0.5)
    w = weights(out)
    assert w["c0.w"] == (4, 3, 3, 3) and w["g.w"] == (4, 2, 3, 3) and w["c2.w"] == (4, 4, 1, 1)


def test_flatten_into_gemm_prunes_feature_blocks():
    parts = [conv("c0", "x", 3, 8)]
    gemm_w = numpy_helper.from_array(RNG.standard_normal((10, 8 * 16)).astype(np.float32), "fc.w")
    extra = [helper.make_node("Relu", ["c0"], ["r"]), helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc.w"], ["y"], name="fc", transB=1)]
    parts.append(([], [gemm_w]))
    proto = model(parts, "y", (1, 10), in_shape=(1, 3, 4, 4), extra_nodes=extra)
    g = group_with(groups_of(proto), "c0")
    assert g.n == 8 and g.width(("f", 1)) == 16
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["fc.w"] == (10, 4 * 16)


def test_allowzero_reshape_into_gemm():
    """The dynamo exporter's Flatten: Reshape(allowzero=1) to a constant (-1, C*H*W). allowzero only changes what
    a 0 entry means, so the feature blocks prune as after a Flatten."""
    parts = [conv("c0", "x", 3, 8), ([], [numpy_helper.from_array(np.array([-1, 8 * 16], np.int64), "shape"),
                                          numpy_helper.from_array(RNG.standard_normal((8 * 16, 10))
                                                                  .astype(np.float32), "fc.w")])]
    extra = [helper.make_node("Relu", ["c0"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["f"], allowzero=1),
             helper.make_node("Gemm", ["f", "fc.w"], ["y"], name="fc")]
    proto = model(parts, "y", (1, 10), in_shape=(1, 3, 4, 4), extra_nodes=extra)
    g = group_with(groups_of(proto), "c0")
    assert g.prunable, g.blocked
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["fc.w"] == (4 * 16, 10)


def test_batchnorm_parameters_follow_their_channels():
    bn = [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in
          {"s": RNG.random(8) + 0.5, "b": RNG.standard_normal(8), "m": RNG.standard_normal(8), "v": RNG.random(8) + 0.5}
          .items()]
    parts = [conv("c0", "x", 3, 8, bias=False), conv("c1", "r", 8, 4), ([], bn)]
    extra = [helper.make_node("BatchNormalization", ["c0", "bn.s", "bn.b", "bn.m", "bn.v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"])]
    proto = model(parts, "c1", (1, 4, 8, 8), extra_nodes=extra)
    out, _ = pruned(proto, ratio=0.25, criterion="bn")
    w = weights(out)
    assert all(w[f"bn.{k}"] == (6,) for k in "sbmv") and w["c1.w"] == (4, 6, 3, 3)
    kept_scales = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "bn.s"))
    original = numpy_helper.to_array(bn[0])
    assert sorted(kept_scales.tolist()) == sorted(np.sort(np.abs(original))[2:].tolist())  # the 2 smallest went


def test_unknown_op_blocks_its_group_and_says_why():
    axis = numpy_helper.from_array(np.array(1, dtype=np.int64), "axis")
    parts = [conv("c0", "x", 3, 8), conv("c1", "cs", 8, 8), conv("c2", "c1", 8, 4), ([], [axis])]
    extra = [helper.make_node("CumSum", ["c0", "axis"], ["cs"], name="running_sum")]
    proto = model(parts, "c2", (1, 4, 8, 8), extra_nodes=extra)
    an = groups_of(proto)
    blocked = group_with(an, "c0")
    assert not blocked.prunable
    assert ("running_sum", "op CumSum is not understood by the channel analysis") in blocked.blocked
    assert group_with(an, "c1").prunable  # the next group is independent of the blockage
    out, report = pruned(proto, ratio=0.5)
    assert weights(out)["c0.w"] == (8, 3, 3, 3) and weights(out)["c1.w"] == (4, 8, 3, 3)
    row = next(r for r in report.groups if "c0" in r.layers)
    assert row.status == "blocked" and row.blocked_by[0]["node"] == "running_sum"


def test_protected_node_keeps_its_channels():
    parts = [conv("c0", "x", 3, 8), conv("c1", "c0", 8, 8), conv("c2", "c1", 8, 4)]
    proto = model(parts, "c2", (1, 4, 8, 8))
    out, report = pruned(proto, ratio=0.5, protect=["c1"])
    w = weights(out)
    assert w["c0.w"] == (4, 3, 3, 3) and w["c1.w"] == (8, 4, 3, 3)
    assert any(b["reason"] == "protected node" for r in report.groups for b in r.blocked_by)


def test_split_and_slice_on_the_channel_axis():
    split = numpy_helper.from_array(np.array([3, 5], dtype=np.int64), "sizes")
    sl = [numpy_helper.from_array(np.array([v], dtype=np.int64), n) for n, v in
          (("st", 2), ("en", 7), ("ax", 1))]
    parts = [conv("c0", "x", 3, 8), conv("ca", "s0", 3, 4), conv("cb", "s1", 5, 4), conv("cs", "sl", 5, 4),
             ([], [split, *sl])]
    extra = [helper.make_node("Split", ["c0", "sizes"], ["s0", "s1"], axis=1),
             helper.make_node("Slice", ["c0", "st", "en", "ax"], ["sl"]),
             helper.make_node("Add", ["ca", "cb"], ["ab"]), helper.make_node("Add", ["ab", "cs"], ["y"])]
    proto = model(parts, "y", (1, 4, 8, 8), extra_nodes=extra)
    out, _ = pruned(proto, ratio=0.5)
    w = weights(out)
    assert w["c0.w"][0] < 8 and w["ca.w"][1] + w["cb.w"][1] == w["c0.w"][0]


def test_dynamic_reshape_target_is_rewritten():
    """A (batch, C*4) -> (batch, C, 4) reshape whose target is a constant: the C entry is rewritten."""
    shape = numpy_helper.from_array(np.array([0, 8, 4], dtype=np.int64), "shape")
    fc_w = numpy_helper.from_array(RNG.standard_normal((32, 6)).astype(np.float32), "fc.w")
    head = numpy_helper.from_array(RNG.standard_normal((8, 3)).astype(np.float32), "head.w")
    extra = [helper.make_node("MatMul", ["x", "fc.w"], ["h"], name="fc"),
             helper.make_node("Flatten", ["h"], ["hf"], axis=1),
             helper.make_node("MatMul", ["hf", "proj.w"], ["p"], name="proj"),
             helper.make_node("Reshape", ["p", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "head.w"], ["y"], name="head")]
    proj = numpy_helper.from_array(RNG.standard_normal((6 * 5, 32)).astype(np.float32), "proj.w")
    proto = model([([], [shape, fc_w, head, proj])], "y", (1, 4, 3), in_shape=(1, 5, 32), extra_nodes=extra, opset=11)
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["proj.w"][1] == 16 and weights(out)["head.w"] == (4, 3)  # 8 rows of 4 -> 4 rows of 4
    new_shape = next(t for t in out.graph.initializer if t.name.startswith("shape") and t.name != "shape")
    assert numpy_helper.to_array(new_shape).tolist() == [0, 4, 4]


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_ratio_zero_changes_nothing(criterion):
    parts = [conv("c0", "x", 3, 8), conv("c1", "c0", 8, 4)]
    proto = model(parts, "c1", (1, 4, 8, 8))
    out, report = pruned(proto, ratio=0.0, criterion=criterion)
    assert weights(out) == weights(proto) and report.macs_after == report.macs_before


def test_prune_pass_reads_its_options_from_the_context():
    from graphopt.pipeline import PassContext, get_pass

    proto = model([conv("c0", "x", 3, 8), conv("c1", "c0", 8, 8), conv("c2", "c1", 8, 4)], "c2", (1, 4, 8, 8))
    m = graphopt.load(proto)
    pass_ = get_pass("prune-channels")
    assert not pass_.lossless
    result = pass_.run(m, PassContext(config={"prune-channels.ratio": 0.5}))
    assert result.changes == 4 and result.details["report"]["macs_kept"] == pytest.approx(0.6)
    assert weights(onnx.load_from_string(graphopt.to_bytes(m)))["c1.w"] == (4, 8, 3, 3)  # c0 is protected


@pytest.mark.parametrize("op", ["InstanceNormalization", "GroupNormalization"])
def test_instance_and_group_norm(op):
    groups = 4
    # per-channel scale and bias (GroupNormalization since opset 21)
    params = [numpy_helper.from_array((RNG.random(8) + 0.5).astype(np.float32), "n.s"),
              numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "n.b")]
    attrs = {"num_groups": groups} if op == "GroupNormalization" else {}
    parts = [conv("c0", "x", 3, 8), conv("c1", "r", 8, 4), ([], params)]
    extra = [helper.make_node(op, ["c0", "n.s", "n.b"], ["n"], name="norm", **attrs),
             helper.make_node("Relu", ["n"], ["r"])]
    proto = model(parts, "c1", (1, 4, 8, 8), extra_nodes=extra, opset=21)
    g = group_with(groups_of(proto), "c0")
    assert g.n == (groups if op == "GroupNormalization" else 8)  # whole normalization groups go together
    out, _ = pruned(proto, ratio=0.5)
    w = weights(out)
    assert w["c0.w"] == (4, 3, 3, 3) and w["n.s"] == (4,) and w["c1.w"] == (4, 4, 3, 3)
    if op == "GroupNormalization":
        assert helper.get_attribute_value(next(a for a in node(out, "norm").attribute if a.name == "num_groups")) == 2


def test_conv_transpose_in_and_out_channels():
    wt = numpy_helper.from_array(RNG.standard_normal((8, 6, 2, 2)).astype(np.float32), "up.w")
    parts = [conv("c0", "x", 3, 8), conv("c1", "u", 6, 4), ([], [wt])]
    extra = [helper.make_node("ConvTranspose", ["c0", "up.w"], ["u"], name="up", strides=[2, 2])]
    proto = model(parts, "c1", (1, 4, 16, 16), extra_nodes=extra)
    out, _ = pruned(proto, ratio=0.5)
    assert weights(out)["up.w"] == (4, 3, 2, 2) and weights(out)["c1.w"] == (4, 3, 3, 3)
