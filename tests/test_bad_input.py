"""Bad input gets one clear message naming the problem (and node), a non-zero exit,
no traceback, an untouched input file and no output file."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from graphopt.cli import main


def small_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul_1"),
         helper.make_node("Relu", ["h"], ["y"], name="relu_1")],
        "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.ones((64, 64), np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unchecked(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def expect_failure(path, capsys, tmp_path, *patterns: str) -> str:
    before = digest(path)
    out = tmp_path / "out.onnx"
    code, err = run_cli(["optimize", str(path), "-o", str(out)], capsys)
    assert code == 2
    assert "Traceback" not in err
    for pattern in patterns:
        assert pattern in err, err
    assert digest(path) == before
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return err


def test_corrupt_protobuf(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    expect_failure(path, capsys, tmp_path, "corrupt")


def test_truncated_file(tmp_path, capsys):
    data = small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    expect_failure(path, capsys, tmp_path, "truncated")


def test_text_file_is_not_a_model(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    err = expect_failure(path, capsys, tmp_path, "error:")
    assert "corrupt" in err or "not an ONNX model" in err


def test_dangling_edge_names_the_node(tmp_path, capsys):
    model = small_model()
    model.graph.node[1].input[0] = "nowhere"
    expect_failure(unchecked(model, tmp_path / "m.onnx"), capsys, tmp_path, "dangling edge", "relu_1", "nowhere")


def test_cycle_names_the_nodes(tmp_path, capsys):
    model = small_model()
    model.graph.node[0].input[0] = "y"  # matmul reads relu's output
    expect_failure(unchecked(model, tmp_path / "m.onnx"), capsys, tmp_path, "cycle", "matmul_1", "relu_1")


def test_duplicate_output_names(tmp_path, capsys):
    model = small_model()
    model.graph.node[1].output[0] = "h"
    expect_failure(unchecked(model, tmp_path / "m.onnx"), capsys, tmp_path, "duplicate value name 'h'", "matmul_1")


def test_missing_external_data(tmp_path, capsys):
    onnx.save(small_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0)
    (tmp_path / "m.bin").unlink()
    expect_failure(tmp_path / "m.onnx", capsys, tmp_path, "external data file 'm.bin' is missing", "'W'")


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/hostname", "sub/../../x.bin"])
def test_external_data_escaping_the_folder(tmp_path, capsys, location):
    model = small_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = T.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64 * 64 * 4)
    expect_failure(unchecked(model, folder / "m.onnx"), capsys, tmp_path, "escapes the model's folder", "'W'")


def test_output_equal_to_input(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    before = digest(path)
    code, err = run_cli(["optimize", str(path), "-o", str(path)], capsys)
    assert code == 2 and "output path is the input" in err
    assert digest(path) == before


def test_missing_input_file_and_output_folder(tmp_path, capsys):
    code, err = run_cli(["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 2 and "no such model file" in err
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    code, err = run_cli(["optimize", str(path), "-o", str(tmp_path / "missing" / "o.onnx")], capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_op_and_domain_pass_through(tmp_path, capsys):
    model = small_model()
    model.graph.node.append(helper.make_node("FancyOp", ["y"], ["z"], name="fancy", domain="vendor.ops", k=3))
    model.graph.node.append(helper.make_node("NotARealOp", ["x"], ["unused"], name="mystery"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("vendor.ops", 1))
    path = unchecked(model, tmp_path / "m.onnx")
    code, _ = run_cli(["optimize", path, "-o", str(tmp_path / "o.onnx")], capsys)
    assert code == 0
    out = onnx.load(tmp_path / "o.onnx")
    ops = {(n.domain, n.op_type) for n in out.graph.node}
    assert ("vendor.ops", "FancyOp") in ops
    assert ("", "NotARealOp") in ops  # dead, but graphopt cannot know it has no effects: kept


def test_console_script_exits_cleanly_without_traceback(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f")
    proc = subprocess.run([sys.executable, "-m", "graphopt", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3


@pytest.mark.parametrize("side", ["original", "candidate"])
def test_verify_names_the_node_of_a_broken_model(tmp_path, capsys, side):
    """verify reads its files through graphopt's loader first: onnxruntime's own message names no node."""
    good = tmp_path / "good.onnx"
    onnx.save(small_model(), good)
    broken = small_model()
    broken.graph.node[1].input[0] = "nowhere"
    bad = unchecked(broken, tmp_path / "bad.onnx")
    args = ["verify", bad, str(good)] if side == "original" else ["verify", str(good), bad]
    code, err = run_cli(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert "dangling edge" in err and "relu_1" in err and "nowhere" in err
