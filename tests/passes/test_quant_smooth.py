"""SmoothQuant in dynamic mode (passes/quant/smooth.py) on hand-built LayerNorm -> MatMul graphs whose
LayerNorm output has a few outlier channels, as BERT-style models' do."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.passes.quant import QuantConfig, quantize
from graphopt.passes.quant.evaluate import output_errors, run_outputs
from graphopt.passes.quant.plan import make_plan
from graphopt.passes.quant.smooth import apply_smoothing, plan_smoothing

HIDDEN, ROWS = 64, 24
DYNAMIC = dict(mode="dynamic", latency_aware=False, fuse=False)
STATIC = dict(DYNAMIC, mode="static")
STATIC_MSE = dict(STATIC, method="mse")  # the range of x / s from a histogram of the sampled rows


def ln_model(residual: bool, gemm_readers: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNorm (gamma 20-40x larger on three channels) -> three projections (q, k, v), optionally also
    read by a residual Add (post-LN, so the 1/s cannot fold into the LayerNorm). ``gemm_readers``: the
    projections are Gemms with transB=1 on a 2-D input (GPT-2's layout)."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(HIDDEN, np.float32)
    gamma[[3, 17, 40]] = [30.0, -25.0, 40.0]
    inits = {"gamma": gamma, "beta": (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln")]
    outputs = []
    for name in ("q", "k", "v"):
        w = (rng.standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32)
        if gemm_readers:
            inits[f"w_{name}"] = np.ascontiguousarray(w.T)
            nodes.append(helper.make_node("Gemm", ["h", f"w_{name}"], [name], transB=1, name=f"proj_{name}"))
        else:
            inits[f"w_{name}"] = w
            nodes.append(helper.make_node("MatMul", ["h", f"w_{name}"], [name], name=f"proj_{name}"))
        outputs.append(name)
    if residual:
        nodes.append(helper.make_node("Add", ["h", "q"], ["res"], name="residual"))
        outputs[0] = "res"
    shape = [ROWS, HIDDEN] if gemm_readers else [1, ROWS, HIDDEN]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, shape) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def calib(gemm_readers: bool = False, n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (ROWS, HIDDEN) if gemm_readers else (1, ROWS, HIDDEN)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def error(proto: onnx.ModelProto, model: graphopt.Model, feeds) -> float:
    return output_errors(run_outputs(proto.SerializeToString(), feeds),
                         run_outputs(graphopt.to_bytes(model), feeds))["rel_l2"]


@pytest.mark.parametrize("mode", [DYNAMIC, STATIC, STATIC_MSE], ids=["dynamic", "static", "static-mse"])
@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_lowers_the_error_of_outlier_channels(residual, mode):
    proto, data, held = ln_model(residual), calib(), calib(n=4, seed=9)
    plain, _ = quantize(proto, data, QuantConfig(**mode, smooth=False))
    smoothed, report = quantize(proto, data, QuantConfig(**mode))
    assert error(proto, smoothed, held) < 0.6 * error(proto, plain, held)  # 0.26-0.41 here (VNNI), any scheme
    assert any(note.startswith("smoothed h ") for note in report.notes), report.notes
    assert any("kept" in note for note in report.notes if note.startswith("smoothing"))
    muls = [n for n in smoothed.graph if n.op_type == "Mul"]
    if residual:  # the residual reads the LayerNorm output as it was: the 1/s is a Mul read by the projections only
        assert len(muls) == 1
        readers = muls[0].outputs[0].users()
        if mode["mode"] == "dynamic":  # the three projections, merged into one (dynamic.py)
            assert [n.op_type for n in readers] == ["DynamicQuantizeMatMul"]
        else:  # one QuantizeLinear of x / s, with its own range, for the three projections
            assert [n.op_type for n in readers] == ["QuantizeLinear"]
    else:  # read by the projections alone: folded into the LayerNorm's scale and bias
        assert not muls
        ln = next(n for n in smoothed.graph if n.op_type == "LayerNormalization")
        assert ln.inputs[1].name != "gamma" and ln.inputs[2].name != "beta"


@pytest.mark.parametrize("gemm_readers", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_alone_leaves_the_float_model_unchanged(residual, gemm_readers):
    """Applied without quantizing, x / s times s * W is the same product: outputs match to float rounding,
    for MatMul (K, N) and Gemm transB (N, K) weights, also when one reader is left out (it keeps W)."""
    proto, data = ln_model(residual, gemm_readers), calib(gemm_readers)
    model = graphopt.load(proto)
    plan = make_plan(model, {"MatMul", "Gemm"})
    smoothings, _ = plan_smoothing(model, plan.candidates, data, QuantConfig(**DYNAMIC))
    assert [s.activation for s in smoothings] == ["h"] and smoothings[0].error[1] < smoothings[0].error[0]
    for selected in ({"proj_q", "proj_k", "proj_v"}, {"proj_k"}):
        model = graphopt.load(proto)
        notes, divided = apply_smoothing(model, smoothings, selected)
        assert len(notes) == 1 and len(divided) == 1
        assert (next(iter(divided)) == "h") == (not residual and len(selected) == 3)  # folded into the LayerNorm
        if "proj_q" not in selected:  # left float: reads h and w_q as they were
            proj_q = next(n for n in model.graph if n.name == "proj_q")
            assert [v.name for v in proj_q.inputs] == ["h", "w_q"]
        held = calib(gemm_readers, n=2, seed=5)
        got, ref = run_outputs(graphopt.to_bytes(model), held), run_outputs(proto.SerializeToString(), held)
        for r, g in zip(ref, got, strict=True):
            for name in r:
                np.testing.assert_allclose(g[name], r[name], rtol=1e-4, atol=1e-4)


def test_narrow_unfoldable_readers_are_not_smoothed():
    """One K -> K projection behind a Mul of K values per row: the extra op costs more than it serves."""
    proto = ln_model(residual=True)
    del proto.graph.node[2:4]  # drop proj_k and proj_v: proj_q alone reads h (besides the residual)
    del proto.graph.output[1:]
    model = graphopt.load(proto)
    assert plan_smoothing(model, make_plan(model, {"MatMul", "Gemm"}).candidates, calib(),
                          QuantConfig(**DYNAMIC)) == ([], [])


def test_no_smooth_turns_it_off():
    _, report = quantize(ln_model(False), calib(), QuantConfig(**DYNAMIC, smooth=False))
    assert not any("smooth" in note for note in report.notes)
    assert "smoothing plan" not in report.timings_s


@pytest.mark.parametrize("mode", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_smoothing_needs_enough_calibration_rows(mode):
    """4 samples of 24 rows: each channel's max is too rough a guess (in static mode every smoothed channel
    nears the range's edge and would clip on new data)."""
    _, report = quantize(ln_model(False), calib(n=4), QuantConfig(**mode))
    assert any(note.startswith("h not smoothed: 96 calibration rows") for note in report.notes), report.notes
    assert not any(note.startswith("smoothed") for note in report.notes)


@pytest.mark.parametrize("mode, rows", [(DYNAMIC, 13 * 24), (STATIC, 16 * 24)], ids=["dynamic", "static"])
def test_dynamic_statistics_stop_after_enough_rows(monkeypatch, mode, rows):
    """Dynamic mode reads samples until STAT_ROWS rows (13 of these 24-row samples for 300); static mode reads
    every sample, since they set the static range of x / s. (The row count shows in the note MIN_ROWS gives.)"""
    monkeypatch.setattr("graphopt.passes.quant.smooth.STAT_ROWS", 300)
    monkeypatch.setattr("graphopt.passes.quant.smooth.MIN_ROWS", 10**6)
    model = graphopt.load(ln_model(False))
    _, notes = plan_smoothing(model, make_plan(model, {"MatMul", "Gemm"}).candidates, calib(), QuantConfig(**mode))
    assert notes and notes[0].startswith(f"h not smoothed: {rows} calibration rows"), notes
