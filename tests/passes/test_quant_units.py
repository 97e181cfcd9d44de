"""Quantization pieces on hand-built graphs: weight sharing, per-channel axes, int32 bias, Relu absorption,
calibration ranges, bad calibration data, and the budget search."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from rich.console import Console

import graphopt
from graphopt.passes.quant import CalibrationError, QuantConfig, quantize
from graphopt.passes.quant.budget import fit_budget
from graphopt.passes.quant.evaluate import output_errors, run_outputs
from graphopt.passes.quant.qdq import insert_static
from graphopt.passes.quant.qparams import activation_qparams, fake_quant, quantize_weight
from graphopt.passes.quant.ranges import Histogram, clip_range
from graphopt.passes.quant.report import render

RNG = np.random.default_rng(0)
EXACT = dict(latency_aware=False, fuse=False, op_types=["Conv", "Gemm", "MatMul", "Add"])


def make_model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def tensor(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def samples(shape, n=16, name="x"):
    return [{name: RNG.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def initializers(model: graphopt.Model) -> dict[str, np.ndarray]:
    return {name: v.const.numpy() for name, v in model.graph.initializers.items()}


def nodes(model: graphopt.Model, op: str) -> list:
    return [n for n in model.graph if n.op_type == op]


def shared_weight_model() -> onnx.ModelProto:
    w = (RNG.standard_normal((32, 32)) / 6).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
                       helper.make_node("Relu", ["a"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "w"], ["y"], name="mm2")],
                      [tensor("x", [4, 32])], [tensor("y", [4, 32])], {"w": w})


def test_shared_initializer_is_quantized_once_and_matches_fp32():
    proto = shared_weight_model()
    calib = samples((4, 32))
    model, report = quantize(proto, calib, QuantConfig(**EXACT))
    int8 = [k for k, v in initializers(model).items() if v.dtype == np.int8 and v.shape == (32, 32)]
    assert len(int8) == 1, int8  # one int8 copy of "w", read by both MatMuls through one DequantizeLinear
    assert "w" not in initializers(model)  # the float copy is gone
    assert report.quantized_nodes == 2
    errors = output_errors(run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib))
    assert errors["cosine"] > 0.999, errors


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_per_channel_axis_follows_trans_b(trans_b):
    w = RNG.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    scale_per_out = np.geomspace(0.01, 10, 8).astype(np.float32)  # very different channel ranges
    w = w * (scale_per_out[:, None] if trans_b else scale_per_out[None, :])
    b = RNG.standard_normal(8).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b, name="gemm")],
                       [tensor("x", [2, 16])], [tensor("y", [2, 8])], {"w": w, "b": b})
    calib = samples((2, 16))
    model, _ = quantize(proto, calib, QuantConfig(**EXACT))
    dq_w = next(n for n in nodes(model, "DequantizeLinear")
                if n.inputs[0].const is not None and n.inputs[0].const.numpy().dtype == np.int8)
    assert dq_w.attr("axis") == (0 if trans_b else 1)
    assert dq_w.inputs[1].const.numpy().shape == (8,)
    got = run_outputs(graphopt.to_bytes(model), calib)
    ref = run_outputs(proto.SerializeToString(), calib)
    assert output_errors(ref, got)["sqnr_db"] > 30  # a per-tensor scale would drown the small channels


def test_conv_bias_is_int32_with_input_times_weight_scale():
    w = (RNG.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    b = RNG.standard_normal(8).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("Relu", ["c"], ["r"], name="relu"),
                        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 1, 1])], {"w": w, "b": b})
    calib = samples((1, 3, 8, 8))
    model, report = quantize(proto, calib, QuantConfig(**EXACT))
    conv = nodes(model, "Conv")[0]
    x_dq, w_dq, b_dq = (v.producer for v in conv.inputs)
    assert b_dq.op_type == "DequantizeLinear" and b_dq.inputs[0].const.numpy().dtype == np.int32
    expected = x_dq.inputs[1].const.numpy() * w_dq.inputs[1].const.numpy()
    np.testing.assert_allclose(b_dq.inputs[1].const.numpy(), expected, rtol=1e-6)
    assert not np.any(b_dq.inputs[2].const.numpy())  # zero point 0
    # The Relu is gone: the conv's QuantizeLinear (zero point 0) clamps instead.
    assert not nodes(model, "Relu") and [o.name for o in model.graph.outputs] == ["y"]
    assert {row.tensor for row in report.layers if row.kind == "activation"} == {"x", "r"}  # SQNR vs the Relu out
    got = run_outputs(graphopt.to_bytes(model), calib)
    assert output_errors(run_outputs(proto.SerializeToString(), calib), got)["cosine"] > 0.999
    assert all(float(np.min(o["y"])) >= 0 for o in got)


def test_weight_quantization_per_channel_and_reduce_range():
    w = RNG.standard_normal((4, 10)).astype(np.float32) * np.array([[1e-3], [1], [10], [0]], np.float32)
    q, qp = quantize_weight(w, 0)
    assert q.dtype == np.int8 and qp.scale.shape == (4,) and np.all(qp.scale > 0)  # zero channel: scale > 0
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[:3], [127, 127, 127])
    q7, _ = quantize_weight(w, 0, reduce_range=True)
    assert np.abs(q7).max() == 63


def test_activation_params_and_fake_quant():
    qp = activation_qparams(0.0, 6.0, np.dtype(np.uint8), symmetric=False)
    assert int(qp.zero_point) == 0 and qp.scale == pytest.approx(6 / 255)
    x = np.linspace(-1, 7, 50).astype(np.float32)
    y = fake_quant(x, qp)
    assert y.min() == 0 and y.max() == pytest.approx(6.0)  # clamps like Relu6
    sym = activation_qparams(-2.0, 1.0, np.dtype(np.int8), symmetric=True)
    assert int(sym.zero_point) == 0 and sym.scale == pytest.approx(2 / 127.5)


def histogram(values: np.ndarray) -> Histogram:
    h = Histogram()
    h.observe(float(values.min()), float(values.max()), values)
    h.finish()
    return h


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_methods_cut_rare_outliers(method):
    values = np.concatenate([RNG.standard_normal(200_000), [80.0, -60.0]]).astype(np.float32)
    lo, hi = clip_range(histogram(values), method, 256, percentile=99.99)
    assert -60 < lo < -2 and 2 < hi < 80, (lo, hi)
    assert clip_range(histogram(values), "minmax", 256) == (pytest.approx(-60), pytest.approx(80))


def test_mse_range_is_best_on_its_own_criterion():
    values = RNG.laplace(size=200_000).astype(np.float32) * np.where(RNG.random(200_000) < 0.5, 1, 0.2)
    h = histogram(values)

    def mse(rng):
        qp = activation_qparams(*rng, np.dtype(np.uint8), False)
        return float(np.mean((fake_quant(values, qp) - values) ** 2))

    best = mse(clip_range(h, "mse", 256))
    assert best < 0.9 * mse(clip_range(h, "minmax", 256))
    assert best <= 1.05 * min(mse(clip_range(h, m, 256)) for m in ("percentile", "entropy"))


def test_budget_search_keeps_fewest_sensitive_layers_float():
    cost = {"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.05}  # each layer's error when quantized
    calls = []

    def error_of(floats, full):
        calls.append(frozenset(floats))
        return sum(v for k, v in cost.items() if k not in floats)

    floats, error, met = fit_budget(["a", "b", "c", "d"], 0.2, error_of)
    assert floats == {"a", "b"} and met and error == pytest.approx(0.15)
    floats, error, met = fit_budget(["a", "b", "c", "d"], -1.0, error_of)
    assert not met and floats == {"a", "b", "c", "d"}


def test_bad_calibration_data_names_the_input():
    proto = shared_weight_model()
    with pytest.raises(CalibrationError, match="no input 'x'"):
        quantize(proto, [{"input": np.zeros((4, 32), np.float32)}])
    with pytest.raises(CalibrationError, match="'x' is int64"):
        quantize(proto, [{"x": np.zeros((4, 32), np.int64)}])
    with pytest.raises(CalibrationError, match="'x' has rank 3"):
        quantize(proto, [{"x": np.zeros((1, 4, 32), np.float32)}])


def test_nan_calibration_data_names_the_input():
    bad = samples((4, 32))
    bad[3]["x"][0, 5] = np.nan
    with pytest.raises(CalibrationError, match=r"'x' holds NaN \(sample 3\)"):
        quantize(shared_weight_model(), bad)


@pytest.mark.parametrize("mode, stage", [("static", "model (calibration)"), ("dynamic", "fp32 model")])
def test_a_model_onnxruntime_rejects_is_one_clear_error(mode, stage):
    proto = shared_weight_model()
    proto.graph.node[1].op_type = "NotARealOp"
    with pytest.raises(graphopt.GraphoptError, match=rf"cannot load the {re.escape(stage)}.*NotARealOp") as err:
        quantize(proto, samples((4, 32)), QuantConfig(mode=mode))
    assert "\n" not in str(err.value)


def test_a_sample_the_model_cannot_run_is_named():
    shape = np.array([4, 32], np.int64)
    proto = make_model([helper.make_node("Reshape", ["x", "shape"], ["f"], name="fixed"),
                        helper.make_node("MatMul", ["f", "w"], ["y"], name="mm")],
                       [tensor("x", ["n", 32])], [tensor("y", [4, 32])],
                       {"shape": shape, "w": np.eye(32, dtype=np.float32)})
    calib = samples((4, 32), n=3) + samples((2, 32), n=1)
    with pytest.raises(graphopt.GraphoptError, match="cannot run the model on calibration sample 3") as err:
        quantize(proto, calib, QuantConfig(latency_aware=False))
    assert "graphopt bug" not in str(err.value)


def test_exclude_names_an_existing_node():
    with pytest.raises(graphopt.GraphoptError, match="no node named 'mm3' to exclude"):
        quantize(shared_weight_model(), samples((4, 32)), QuantConfig(nodes_to_exclude=["mm1", "mm3"]))


def test_excluding_a_node_fused_under_another_name_is_reported():
    """MatMul + Add becomes a Gemm named by the fusion: the exported MatMul's name no longer exists."""
    w = (RNG.standard_normal((32, 16)) / 6).astype(np.float32)
    b = RNG.standard_normal(16).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Add", ["h", "b"], ["y"], name="bias")],
                       [tensor("x", [4, 32])], [tensor("y", [4, 16])], {"w": w, "b": b})
    model, report = quantize(proto, samples((4, 32)), QuantConfig(latency_aware=False, nodes_to_exclude=["mm"]))
    assert [n.op_type for n in model.graph if n.op_type in ("Gemm", "MatMul")] == ["Gemm"]
    assert any(note.startswith("--exclude mm: fused") for note in report.notes)


def test_latency_batch_times_the_sample_repeated_along_the_batch_axis(monkeypatch):
    """The latency check sees the first calibration sample stacked latency_batch times; a model whose leading
    axis is fixed has no batch to stack along, and says so before any work."""
    feeds = []

    def fake_latency(model, baseline, feed):
        feeds.append(feed)
        return 0.5, {"quantized": 0.5, "fp32": 1.0}

    monkeypatch.setattr("graphopt.passes.quant.api.paired_latency", fake_latency)
    w = (RNG.standard_normal((32, 32)) / 6).astype(np.float32)
    batched = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                         [tensor("x", ["n", 32])], [tensor("y", ["n", 32])], {"w": w})
    calib = samples((2, 32))
    _, report = quantize(batched, calib, QuantConfig(latency_batch=3))
    assert feeds and all(np.array_equal(f["x"], np.concatenate([calib[0]["x"]] * 3)) for f in feeds)
    console = Console(record=True, width=160)
    console.print(render(report))
    assert report.latency_batch == 3 and "latency (ORT CPU, batch 3)" in console.export_text()
    feeds.clear()
    quantize(batched, calib, QuantConfig())
    assert feeds and all(f["x"] is calib[0]["x"] for f in feeds)
    with pytest.raises(graphopt.GraphoptError, match=r"input 'x' has no free leading \(batch\) axis \(shape \[4, 32\]"):
        quantize(shared_weight_model(), samples((4, 32)), QuantConfig(latency_batch=8))
    with pytest.raises(graphopt.GraphoptError, match="latency_batch must be at least 1"):
        quantize(batched, calib, QuantConfig(latency_batch=0))


@pytest.mark.parametrize(("readings", "decides"), [
    ([0.88, 0.90], 0.90),  # both pay: the reading nearer the threshold
    ([1.20, 1.10], 1.10),  # neither pays: likewise, and no third timing
    ([1.20, 0.88, 0.87], 0.88),  # one odd reading that gave up int8 is outvoted
    ([0.90, 1.00, 1.10], 1.00),  # one odd reading that kept int8 is outvoted
    ([0.90, 1.00, 0.92], 0.92),
])
def test_a_latency_verdict_needs_a_second_timing_with_fresh_sessions_to_agree(monkeypatch, readings, decides):
    from types import SimpleNamespace

    from graphopt.passes.quant.api import _confirmed

    later, baselines = list(readings[1:]), []

    def fake_latency(model, baseline, feed):
        baselines.append(baseline)
        ratio = later.pop(0)
        return ratio, {"quantized": ratio, "fp32": 1.0}

    monkeypatch.setattr("graphopt.passes.quant.api.paired_latency", fake_latency)
    job = SimpleNamespace(fastest_fp32=b"fp32 model bytes", latency_feed={})
    ratio, times = _confirmed(job, b"int8", readings[0], {"quantized": readings[0], "fp32": 1.0})
    assert ratio == decides and times["quantized"] == decides
    assert not later  # every reading asked for was taken, and no more
    assert baselines == [b"fp32 model bytes"] * (len(readings) - 1)  # a fresh fp32 session each time


def test_timing_rounds_repeat_a_fast_model_enough_to_be_measured():
    """A model of a few microseconds runs many times a round (one run is mostly timer jitter); the ratio of a
    model to itself stays near 1."""
    from graphopt.passes.quant.evaluate import session
    from graphopt.timing import interleaved_ratios

    proto = shared_weight_model()
    runs = []

    class Counting:
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feed):
            runs.append(1)
            return self.sess.run(names, feed)

    sess = session(proto.SerializeToString())
    ratios, ms = interleaved_ratios([Counting(sess), Counting(sess)], samples((4, 32), n=1)[0], seconds=0.2,
                                    min_rounds=5, max_rounds=5)
    assert len(runs) > 4 * 2 * 5 and ms[0] < 1.0  # several runs per model per round, each under a millisecond
    assert 0.7 < ratios[1] < 1.4


def test_config_errors_are_user_errors():
    with pytest.raises(graphopt.GraphoptError, match="unknown method"):
        quantize(shared_weight_model(), samples((4, 32)), QuantConfig(method="kl"))
    with pytest.raises(graphopt.GraphoptError, match="cannot quantize op types"):
        quantize(shared_weight_model(), samples((4, 32)), QuantConfig(op_types=["Softmax"]))


def test_spatial_mean_becomes_global_average_pool():
    w = (RNG.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    axes = np.array([-1, -2], np.int64)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=0, name="mean")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8])], {"w": w, "axes": axes}, opset=18)
    calib = samples((1, 3, 8, 8))
    model, _ = quantize(proto, calib, QuantConfig(latency_aware=False))
    assert [n.op_type for n in model.graph if n.op_type in ("ReduceMean", "GlobalAveragePool", "Flatten")] == \
        ["GlobalAveragePool", "Flatten"]
    assert [o.name for o in model.graph.outputs] == ["y"]
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    assert output_errors(ref, got)["cosine"] > 0.999


def test_maxpool_and_reshape_share_their_input_scale():
    w1 = (RNG.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (RNG.standard_normal((32, 10)) / 5).astype(np.float32)
    shape = np.array([1, 32], np.int64)
    proto = make_model([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("Relu", ["c"], ["r"], name="relu"),
                        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[4, 4], strides=[4, 4], name="pool"),
                        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
                        helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 10])], {"w1": w1, "w2": w2, "shape": shape})
    calib = samples((1, 3, 8, 8))
    model, _ = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False))
    scales = {n.inputs[0].name: float(n.inputs[1].const.numpy()) for n in nodes(model, "QuantizeLinear")}
    assert scales["c"] == scales["p"] == scales["f"]  # one scale from the conv to the classifier: no requantizing
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    assert output_errors(ref, got)["cosine"] > 0.999


def test_a_maxpool_left_float_runs_in_float_and_its_output_is_quantized():
    """The latency check gives layers back by name (the first ones, or whole kinds) with every range calibrated:
    an unselected MaxPool must not be pulled into int8 by its neighbours' shared scale."""
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 20).astype(np.float32)  # |c| well inside the ranges below
    w2 = (rng.standard_normal((8, 8, 1, 1)) / 5).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("Relu", ["c"], ["r"], name="relu"),
                        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
                        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 4, 4])], {"w1": w1, "w2": w2})
    ranges = {"x": (-3.0, 3.0), "c": (-2.0, 2.0), "r": (0.0, 2.0), "p": (0.0, 2.0)}
    for selected, pool_reads in (({"conv2"}, "r"), ({"pool", "conv2"}, "r_dq")):
        model = graphopt.load(proto)
        insert_static(model, selected, ranges, QuantConfig())
        (pool,) = nodes(model, "MaxPool")
        assert pool.inputs[0].name == pool_reads  # float input unless the pool itself is quantized
        calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
        ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
        assert output_errors(ref, got)["cosine"] > 0.995


@pytest.mark.parametrize("opset", [17, 21])
def test_int8_activations_through_data_movement_ops_to_the_outputs_load_in_onnxruntime(opset):
    """onnxruntime 1.32 copies a DequantizeLinear past Transpose/Reshape/MaxPool/... and, on opset 21+, gives
    the copy's QuantizeLinear an output_dtype its int8-to-uint8 conversion then contradicts: quantize used to
    fail on such models with int8 activations. The pair is written after the op instead, outputs keep names."""
    w = (RNG.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1], name="nhwc"),
                        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
                        helper.make_node("Reshape", ["p", "shape"], ["y"], name="flat")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("t", [1, 8, 8, 8]), tensor("y", [1, 128])],
                       {"w": w, "shape": np.array([1, 128], np.int64)}, opset=opset)
    calib = samples((1, 3, 8, 8))
    model, report = quantize(proto, calib, QuantConfig(activation_type="int8", latency_aware=False, fuse=False))
    assert [v.name for v in model.graph.outputs] == ["t", "y"]
    assert report.quantized_nodes >= 1
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    assert output_errors(ref, got)["cosine"] > 0.999


@pytest.mark.parametrize("sentinel", [-3.4028234663852886e38, -1e9, -10000.0])
def test_an_add_of_an_attention_mask_stays_float(sentinel):
    """Scores plus a mask whose masked positions hold a huge negative sentinel: quantized, the sum's scale is
    the sentinel's and the softmax reads garbage (T5's encoder adds its mask through the position bias)."""
    w = (RNG.standard_normal((16, 16)) / 4).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["scores"], name="proj"),
                        helper.make_node("Where", ["keep", "zero", "neg"], ["bias"], name="mask"),
                        helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
                        helper.make_node("Softmax", ["masked"], ["y"], axis=-1, name="softmax")],
                       [tensor("x", [4, 16]), helper.make_tensor_value_info("keep", onnx.TensorProto.BOOL, [4, 16])],
                       [tensor("y", [4, 16])],
                       {"w": w, "zero": np.array(0, np.float32), "neg": np.array(sentinel, np.float32)})
    keep = np.ones((4, 16), bool)
    keep[:, 12:] = False
    calib = [{"x": RNG.standard_normal((4, 16)).astype(np.float32), "keep": keep} for _ in range(8)]
    model, report = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False))
    (kept,) = [f for f in report.kept_float if f.node == "add_mask"]
    assert kept.reason == "ranges" and "sentinel" in kept.detail
    assert output_errors(run_outputs(proto.SerializeToString(), calib),
                         run_outputs(graphopt.to_bytes(model), calib))["cosine"] > 0.999


def test_concat_inputs_share_one_scale():
    wa = (RNG.standard_normal((4, 3, 3, 3)) / 5).astype(np.float32)
    wb = (RNG.standard_normal((4, 3, 3, 3))).astype(np.float32)  # a wider range than the other branch
    wc = (RNG.standard_normal((8, 8, 1, 1)) / 3).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
                        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
                        helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"),
                        helper.make_node("Conv", ["c", "wc"], ["y"], name="conv_c")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8])], {"wa": wa, "wb": wb, "wc": wc})
    calib = samples((1, 3, 8, 8))
    model, _ = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False, op_types=["Conv", "Concat"]))
    scales = {n.inputs[0].name: float(n.inputs[1].const.numpy()) for n in nodes(model, "QuantizeLinear")}
    assert scales["a"] == scales["b"] == scales["c"]
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    assert output_errors(ref, got)["cosine"] > 0.999


def test_concat_of_far_apart_ranges_stays_float():
    """A branch 100x narrower than the other would keep ~2 of the shared scale's levels (ViT's class token)."""
    wa = (RNG.standard_normal((4, 3, 3, 3)) / 100).astype(np.float32)
    wb = (RNG.standard_normal((4, 3, 3, 3))).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
                        helper.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
                        helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="cat")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 8, 8, 8])], {"wa": wa, "wb": wb})
    calib = samples((1, 3, 8, 8))
    model, report = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False, op_types=["Conv", "Concat"]))
    (cat,) = [f for f in report.kept_float if f.node == "cat"]
    assert cat.reason == "ranges" and "input a spans" in cat.detail and "too few levels" in cat.detail
    assert nodes(model, "Concat")[0].inputs[0].producer.op_type == "DequantizeLinear"  # conv_a: int8, then float
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    narrow = output_errors([{"y": r["y"][:, :4]} for r in ref], [{"y": g["y"][:, :4]} for g in got])
    assert narrow["cosine"] > 0.999  # the narrow branch keeps its own scale


def test_output_errors_read_zipmap_probabilities_and_skip_integer_labels():
    # a scikit-learn classifier's outputs: int64 labels and ZipMap's list of {class: probability} maps
    ref = [{"label": np.array([1]), "probabilities": [{0: 0.25, 1: 0.75}]}]
    got = [{"label": np.array([0]), "probabilities": [{0: 0.5, 1: 0.5}]}]
    errors = output_errors(ref, got)
    assert errors["rel_l2"] == pytest.approx(np.hypot(0.25, 0.25) / np.hypot(0.25, 0.75))
    assert errors["cosine"] == pytest.approx((0.125 + 0.375) / np.hypot(0.25, 0.75) / np.hypot(0.5, 0.5))
    assert output_errors(ref, ref)["sqnr_db"] == np.inf


def test_dynamic_siblings_become_one_wider_matmul_with_the_same_outputs(monkeypatch):
    """q, k and v of one input (a MatMul, a MatMul + bias Add, a Gemm with transB) quantized dynamically: one
    DynamicQuantizeMatMul and a Split, the input quantized once; every output bit-identical to the three."""
    import graphopt.passes.quant.dynamic as dynamic

    rng = np.random.default_rng(3)
    inits = {name: rng.standard_normal(shape).astype(np.float32)
             for name, shape in (("wq", (32, 16)), ("wk", (32, 24)), ("bk", (24,)), ("wv", (8, 32)))}
    proto = make_model([helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
                        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k"),
                        helper.make_node("Add", ["k0", "bk"], ["k"], name="k_bias"),
                        helper.make_node("Gemm", ["x", "wv"], ["v"], transB=1, name="v")],
                       [tensor("x", [6, 32])], [tensor("q", [6, 16]), tensor("k", [6, 24]), tensor("v", [6, 8])], inits)
    config = QuantConfig(mode="dynamic", latency_aware=False, fuse=False, smooth=False)
    merged, _ = quantize(proto, samples((6, 32)), config)
    assert [n.op_type for n in merged.graph] == ["DynamicQuantizeMatMul", "Split"]
    monkeypatch.setattr(dynamic, "_merge_siblings", lambda model, build: None)
    separate, _ = quantize(proto, samples((6, 32)), config)
    assert [n.op_type for n in separate.graph] == ["DynamicQuantizeMatMul"] * 3
    feeds = samples((6, 32), n=3)
    for a, b in zip(run_outputs(graphopt.to_bytes(merged), feeds), run_outputs(graphopt.to_bytes(separate), feeds),
                    strict=True):
        assert a.keys() == {"q", "k", "v"} and all(np.array_equal(a[name], b[name]) for name in a)


def test_activations_too_narrow_for_a_float32_scale_stay_float():
    """A squeeze-and-excite whose input has shrunk to ~1e-43 (a random-weight EfficientNet's fifth block): its
    int8 scale would be 0, and onnxruntime refused the QLinearGlobalAveragePool ("out of computation range").
    The layers reading or writing that tensor stay float; the conv before them is quantized."""
    w1 = (RNG.standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (RNG.standard_normal((8, 8, 1, 1)) / 3).astype(np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                        helper.make_node("Relu", ["c"], ["features"], name="relu"),
                        helper.make_node("Mul", ["features", "shrink"], ["tiny"], name="shrink"),
                        helper.make_node("GlobalAveragePool", ["tiny"], ["pooled"], name="squeeze"),
                        helper.make_node("Conv", ["pooled", "w2"], ["y"], name="excite")],
                       [tensor("x", [1, 3, 8, 8])], [tensor("features", [1, 8, 8, 8]), tensor("y", [1, 8, 1, 1])],
                       {"w1": w1, "w2": w2, "shrink": np.array(1e-43, np.float32)})
    calib = samples((1, 3, 8, 8))
    model, report = quantize(proto, calib, QuantConfig(latency_aware=False, fuse=False,
                                                       op_types=["Conv", "GlobalAveragePool"]))
    kept = {f.node: f for f in report.kept_float if f.reason == "ranges"}
    assert set(kept) == {"squeeze", "excite"} and "underflow float32" in kept["squeeze"].detail
    assert report.quantized_nodes == 1  # the first conv, whose output is wide enough
    assert all(float(n.inputs[1].const.numpy()) > 0 for n in nodes(model, "QuantizeLinear"))
    ref, got = run_outputs(proto.SerializeToString(), calib), run_outputs(graphopt.to_bytes(model), calib)
    # the subnormal branch keeps only a few bits in float32 itself: compared where float32 is float32
    assert output_errors([{"f": r["features"]} for r in ref], [{"f": g["features"]} for g in got])["cosine"] > 0.999
    assert all(np.isfinite(g["y"]).all() for g in got)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight_only"])
def test_a_float16_model_stays_float_with_the_reason(mode):
    """onnxruntime's int8 kernels (DynamicQuantizeMatMul, QLinear*) and a float32-scaled DequantizeLinear feed
    float32: quantizing a half-precision export's MatMuls wrote models onnxruntime refused (dynamic and
    weight-only modes). Every such node now stays float, and says why."""
    w = (RNG.standard_normal((16, 16)) / 4).astype(np.float16)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
                        helper.make_node("Relu", ["h"], ["y"], name="act")],
                       [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [4, 16])],
                       [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [4, 16])], {"w": w})
    calib = [{"x": RNG.standard_normal((4, 16)).astype(np.float16)} for _ in range(4)]
    model, report = quantize(proto, calib, QuantConfig(mode=mode, latency_aware=False, fuse=False))
    assert report.quantized_nodes == 0
    (kept,) = [f for f in report.kept_float if f.node == "proj"]
    assert kept.reason == "unsupported" and "float16 weight" in kept.detail
    assert any(note.startswith("no node was quantized") for note in report.notes)
    assert output_errors(run_outputs(proto.SerializeToString(), calib),
                         run_outputs(graphopt.to_bytes(model), calib))["cosine"] == pytest.approx(1.0)
