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


def _with_bias(bias: onnx.TensorProto) -> onnx.ModelProto:
    model = small_model()
    model.graph.node.insert(1, helper.make_node("Add", ["h", "b"], ["hb"], name="add_bias"))
    model.graph.node[2].input[0] = "hb"
    model.graph.initializer.append(bias)
    return model


def _bias_with(**changes) -> onnx.TensorProto:
    bias = numpy_helper.from_array(np.zeros(64, np.float32), "b")
    for field, value in changes.items():
        if field == "dims":
            bias.dims[:] = value
        else:
            setattr(bias, field, value)
    return bias


def _typed_bias() -> onnx.TensorProto:
    bias = onnx.TensorProto(name="b", data_type=T.FLOAT, dims=[64])
    bias.float_data.extend([0.0] * 32)  # typed storage holding half of the values
    return bias


@pytest.mark.parametrize(("bias", "message"), [
    (_bias_with(raw_data=bytes(100)), "holds data for 25 FLOAT values, but its dims [64] need 64"),
    (_bias_with(dims=[128]), "holds data for 64 FLOAT values, but its dims [128] need 128"),
    (_typed_bias(), "holds data for 32 FLOAT values"),
    (_bias_with(data_type=99), "unknown element type (99)"),
    (_bias_with(data_type=T.STRING), "string tensor stored as raw bytes"),
])
def test_initializer_data_that_does_not_fit_its_type_and_dims(tmp_path, capsys, bias, message):
    """Found by mutating zoo models: such initializers crashed the first pass that read them (a reshape
    error, a KeyError on the element type) with a traceback."""
    path = unchecked(_with_bias(bias), tmp_path / "m.onnx")
    expect_failure(path, capsys, tmp_path, "initializer 'b'", message, "'add_bias'")


def _constant_with_a_float_value() -> onnx.NodeProto:
    node = helper.make_node("Constant", [], ["c"], name="const")
    node.attribute.append(helper.make_attribute("value", 1.5))
    return node


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.graph.node[0].input.pop(), "MatMul takes 2 inputs at opset 17, this node has 1"),
    (lambda m: m.graph.node[0].input.__setitem__(1, ""), "input 1 (B) of MatMul is empty, but it is not optional"),
    (lambda m: m.graph.node[1].attribute.append(helper.make_attribute("to", 1)), None),  # unknown attr: as is
    (lambda m: m.graph.node.insert(0, _constant_with_a_float_value()),
     "attribute 'value' of Constant must be TENSOR, not FLOAT"),
    (lambda m: m.graph.node.insert(1, helper.make_node("Cast", ["h"], ["hc"], name="cast", to=10**9))
     or m.graph.node[2].input.__setitem__(0, "hc"), "attribute 'to' of Cast is 1000000000, not an ONNX element type"),
])
def test_nodes_that_break_their_schema(tmp_path, capsys, change, message):
    """A node with too few inputs, an empty required input, an attribute of the wrong type or an element type
    that does not exist: one error naming the node (passes read inputs by position and attributes by type)."""
    model = small_model()
    change(model)
    path = unchecked(model, tmp_path / "m.onnx")
    if message is None:
        assert run_cli(["optimize", path, "-o", str(tmp_path / "out.onnx")], capsys)[0] == 0
        return
    expect_failure(path, capsys, tmp_path, message, "(node '")


def test_a_declared_input_too_large_to_generate(tmp_path, capsys):
    model = small_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 123456789  # 58 GiB of float64 samples
    path = unchecked(model, tmp_path / "m.onnx")
    code, err = run_cli(["verify", path, path], capsys)
    assert code == 2 and "input 'x' of shape [123456789, 64] would take 59 GiB to generate" in err
    assert "--shape NAME=DIMS" in err and "Traceback" not in err
