"""The graphopt command: inspect, optimize, verify, passes (in process, through main())."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphopt.cli import main


def conv_model(bias: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Identity", ["c"], ["i"], name="ident"),
         helper.make_node("Relu", ["i"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "G"], ["y"], transB=1, name="fc")],
        "net", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.full(4, bias, np.float32), "B"),
         numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32), "G")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inspect_json(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    assert main(["inspect", str(path), "--json", "--shape", "N=2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nodes"] == 5 and info["ops"]["Conv"] == 1
    assert info["params"] == 4 * 27 + 4 + 2560 and info["param_bytes"] == info["params"] * 4
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 3, 8, 8]}]
    assert info["macs_by_op"] == {"Conv": 2 * 4 * 64 * 27, "Gemm": 2 * 10 * 256}
    assert info["opsets"] == {"ai.onnx": 17} and info["ir_version"] == onnx.load(path).ir_version


def test_inspect_refuses_a_dim_the_model_does_not_have(tmp_path, capsys):
    """A misspelt dim would leave the MACs counted at size 1 without a word."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    assert main(["inspect", str(path), "--shape", "batch=2"]) == 2
    err = capsys.readouterr().err
    assert "no symbolic dim 'batch'" in err and "N" in err


def test_inspect_table(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Conv" in out and "est. MACs" in out


def test_optimize_json_and_verify(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_model(), path)
    assert main(["optimize", str(path), "-o", str(out), "--verify", "--verify-each", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nodes_before"] == 5 and report["nodes_after"] == 4
    assert report["verify"]["ok"] and report["pipeline"]["passes"]["remove-identity"]["changes"] == 1
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu", "Flatten", "Gemm"]


def test_optimize_with_selected_passes(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_model(), path)
    assert main(["optimize", str(path), "-o", str(out), "--passes", "eliminate-dead-nodes"]) == 0
    assert len(onnx.load(out).graph.node) == 5
    assert "eliminate-dead-nodes" in capsys.readouterr().out
    assert main(["optimize", str(path), "-o", str(out), "--passes", "nope"]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_verify_exit_codes_and_bisect_report(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_model(), a)
    onnx.save(conv_model(bias=0.5), b)
    assert main(["verify", str(a), str(a)]) == 0
    capsys.readouterr()
    assert main(["verify", str(a), str(b), "--json", "--shape", "x=2x3x8x8"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"]
    assert report["divergence"]["node"] == "conv" and report["input_shapes"]["x"] == [2, 3, 8, 8]


def test_verify_with_real_inputs(tmp_path, capsys):
    a = tmp_path / "a.onnx"
    onnx.save(conv_model(), a)
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 8, 8), np.float32))
    assert main(["verify", str(a), str(a), "--inputs", str(tmp_path / "in.npz")]) == 0
    np.savez(tmp_path / "bad.npz", y=np.ones((1, 3, 8, 8), np.float32))
    assert main(["verify", str(a), str(a), "--inputs", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err
    assert "['y'] are not inputs" in err and "it takes x" in err


def test_bad_shape_flag(tmp_path, capsys):
    a = tmp_path / "a.onnx"
    onnx.save(conv_model(), a)
    assert main(["verify", str(a), str(a), "--shape", "x=1xthree"]) == 2
    assert "bad --shape" in capsys.readouterr().err


def test_passes_lists_the_default_pipeline(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "remove-identity" in out and "lift-constants" in out


def test_models_over_the_protobuf_limit_verify_through_external_data(tmp_path, capsys, monkeypatch):
    import graphopt.onnx_io as io_module

    monkeypatch.setattr(io_module, "PROTOBUF_LIMIT", 1000)  # the conv model's weights are ~10 KB
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_model(), path)
    assert main(["optimize", str(path), "-o", str(out), "--verify", "--verify-each", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["ok"]
    assert (tmp_path / "o.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "o.onnx.data"]  # no temp left
