"""tools/bench_tvm.py on the smallest zoo CNN, untuned only: the numbers and the report it prints."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("tvm")

from tools import bench_tvm  # noqa: E402

pytestmark = pytest.mark.xdist_group("tvm")


def test_cpu_row_has_latency_peak_fraction_profile_and_matches_onnxruntime(tmp_path):
    args = argparse.Namespace(rounds=1, repeat=2, profile_top=3, tune_minutes=None, no_untuned=False)
    row = bench_tvm.bench_cpu_model("digits_cnn_dynamo", [], args, tmp_path)
    untuned = row["variants"]["tvm_untuned"]
    assert untuned["matches_ort"] and untuned["ms"] > 0 and row["ort_ms"] > 0
    assert row["macs"] > 0 and 0 < untuned["peak_fraction"] < 2 and row["peak_gflops"] > 0
    assert row["profile"]["kernels"] and any("conv2d" in k["function"] for k in row["profile"]["kernels"])
    text = bench_tvm.cpu_markdown([row])
    assert "digits_cnn_dynamo" in text and "where the time goes" in text and "load average" in text


def test_ratios_are_paired_per_round():
    # a load burst in round 2 slows both sides: the paired ratio stays 2, the ratio of medians would not
    samples = {"ort": [1.0, 5.0, 1.0], "tvm": [2.0, 10.0, 2.5], "peak_gflops": [1.0, 1.0, 1.0]}
    timing = bench_tvm.paired(samples, "ort")
    assert timing["ort"] == (1.0, 1.0) and timing["tvm"] == (2.5, 2.0) and "peak_gflops" not in timing


def test_close_uses_the_fp32_rule():
    ref = {"y": np.array([1.0, -2.0, 3.0], np.float32)}
    assert bench_tvm.close(ref, {"y": ref["y"] * (1 + 5e-5)})[0]
    assert not bench_tvm.close(ref, {"y": ref["y"] * (1 + 1e-3)})[0]


def test_macs_bind_symbolic_dims_inside_the_graph_too(tmp_path):
    """x (batch, seq, 8) -> Relu -> MatMul W (8, 4): the MatMul's input has the dims only by name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert bench_tvm._macs(str(path), {"x": [2, 16, 8]}) == 2 * 16 * 8 * 4
