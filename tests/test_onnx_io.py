"""Import/export: lossless round trips, lazy weights, external data, atomic writes."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import graphopt
from graphopt.errors import ModelSaveError
from graphopt.ir import SourceTensor, verify
from graphopt.onnx_io import to_proto_without_weights
from tests.helpers import normalized, run


def kitchen_sink() -> onnx.ModelProto:
    """Every feature a round trip must keep: functions, control flow, metadata, docs,
    value_info, custom domains, odd attributes and dtypes."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    w.doc_string = "weights"
    half = numpy_helper.from_array(rng.standard_normal(4).astype(np.float16), "half")
    words = numpy_helper.from_array(np.array([b"a", b"\xff\xfe"], dtype=object), "words")
    i4 = helper.make_tensor("i4", T.INT4, [3], [1, -2, 3])

    then_g = helper.make_graph([helper.make_node("Add", ["h", "one"], ["t_out"])], "then",
                               [], [helper.make_tensor_value_info("t_out", T.FLOAT, ["N", 4])])
    else_g = helper.make_graph([helper.make_node("Sub", ["h", "one"], ["e_out"])], "else",
                               [], [helper.make_tensor_value_info("e_out", T.FLOAT, ["N", 4])])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "h_sum"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("iter", T.INT64, []), helper.make_tensor_value_info("cond_in", T.BOOL, []),
         helper.make_tensor_value_info("acc_in", T.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("acc_out", T.FLOAT, [])],
    )
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["scan_out"])],
        "scan_body",
        [helper.make_tensor_value_info("s_in", T.FLOAT, [4]), helper.make_tensor_value_info("row", T.FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", T.FLOAT, [4]), helper.make_tensor_value_info("scan_out", T.FLOAT, [4])],
    )
    double = helper.make_function(
        "custom.fn", "Double", ["a"], ["b"],
        [helper.make_node("Constant", [], ["two"], value_float=2.0),
         helper.make_node("Mul", ["a", "two"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    scale = helper.make_node("Mul", ["a", "s"], ["b"])
    scaled = helper.make_function("custom.fn", "Scaled", ["a", "s"], ["b"], [scale],
                                  [helper.make_opsetid("", 17)], attributes=["unused_attr"])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm", doc_string="the matmul"),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one_t", T.FLOAT, [], [1.0])),
        helper.make_node("ReduceSum", ["h"], ["h_sum"], keepdims=0),
        helper.make_node("If", ["c"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
        helper.make_node("Loop", ["trip", "", "zero"], ["acc"], body=body, name="loop"),
        helper.make_node("Scan", ["zero4", "branch"], ["final", "rows"], body=scan_body, num_scan_inputs=1),
        helper.make_node("Double", ["final"], ["doubled"], domain="custom.fn"),
        helper.make_node("Scaled", ["doubled", "one"], ["y"], domain="custom.fn"),
        helper.make_node("Unknown", ["x"], ["weird"], domain="vendor.x", blob=b"\x00\xff", tags=["a", "b"],
                         ratio=0.1, table=helper.make_tensor("tt", T.INT32, [2], [5, 6])),
    ]
    nodes[0].metadata_props.add(key="source", value="layer1")
    graph = helper.make_graph(
        nodes, "sink",
        [helper.make_tensor_value_info("x", T.FLOAT, ["N", 4]), helper.make_tensor_value_info("c", T.BOOL, []),
         helper.make_tensor_value_info("trip", T.INT64, [])],
        [helper.make_tensor_value_info("y", T.FLOAT, [4]), helper.make_tensor_value_info("acc", T.FLOAT, []),
         helper.make_tensor_value_info("weird", T.FLOAT, None), helper.make_tensor_value_info("rows", T.FLOAT, None)],
        [w, half, words, i4, numpy_helper.from_array(np.float32(0), "zero"),
         numpy_helper.from_array(np.zeros(4, np.float32), "zero4")],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("h", T.FLOAT, ["N", 4])],
    )
    graph.metadata_props.add(key="g", value="1")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.fn", 1),
                                                    helper.make_opsetid("vendor.x", 3)],
                              functions=[double, scaled], producer_name="test", producer_version="9",
                              doc_string="model doc", model_version=7, ir_version=10)
    model.metadata_props.add(key="author", value="me")
    model.domain = "org.test"
    return model


def test_kitchen_sink_round_trip_is_structurally_equal(tmp_path):
    original = kitchen_sink()
    path = tmp_path / "m.onnx"
    onnx.save(original, path)
    model = graphopt.load(path)
    verify(model)
    graphopt.save(model, tmp_path / "out.onnx")
    assert normalized(onnx.load(tmp_path / "out.onnx")) == normalized(original)
    assert normalized(graphopt.to_proto(graphopt.load(original))) == normalized(original)
    assert normalized(graphopt.to_proto(graphopt.load(original.SerializeToString()))) == normalized(original)


def test_round_trip_keeps_odd_bytes_and_dtypes(tmp_path):
    model = graphopt.load(kitchen_sink())
    unknown = next(n for n in model.graph if n.op_type == "Unknown")
    assert unknown.domain == "vendor.x"
    proto = graphopt.to_proto(model)
    node = next(n for n in proto.graph.node if n.op_type == "Unknown")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "blob")) == b"\x00\xff"
    words = next(t for t in proto.graph.initializer if t.name == "words")
    assert list(words.string_data) == [b"a", b"\xff\xfe"]
    i4 = next(t for t in proto.graph.initializer if t.name == "i4")
    assert list(numpy_helper.to_array(i4)) == [1, -2, 3]


def test_outputs_are_bit_identical_in_onnxruntime(tmp_path):
    original = kitchen_sink()
    original.graph.node.pop()  # onnxruntime cannot run the vendor op
    original.graph.output.pop(2)
    path = tmp_path / "m.onnx"
    onnx.save(original, path)
    graphopt.save(graphopt.load(path), tmp_path / "out.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32),
             "c": np.array(True), "trip": np.array(3, dtype=np.int64)}
    for a, b in zip(run(str(path), feeds), run(str(tmp_path / "out.onnx"), feeds), strict=True):
        assert a.tobytes() == b.tobytes()


def test_weights_are_lazy_and_streamed(tmp_path):
    weights = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 1024])],
                              [numpy_helper.from_array(weights, "W")])
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph), path)
    model = graphopt.load(path)
    tensor = model.graph.initializers["W"].const
    assert isinstance(tensor, SourceTensor) and tensor.length == weights.nbytes
    assert os.path.samefile(tensor.source.path, path)
    np.testing.assert_array_equal(tensor.numpy(), weights)
    graphopt.save(model, tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx").read_bytes() == path.read_bytes()  # same field order: byte-identical


def test_external_data_round_trip_and_forced_external(tmp_path):
    original = kitchen_sink()
    onnx.save(kitchen_sink(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin",
              size_threshold=0)
    model = graphopt.load(tmp_path / "ext.onnx")
    assert model.graph.initializers["W"].const.source.external
    out = tmp_path / "sub"
    out.mkdir()
    graphopt.save(model, out / "o.onnx")
    assert (out / "o.onnx.data").exists()  # keeps the external form, next to the new file
    reloaded = onnx.load(out / "o.onnx")
    assert normalized(reloaded) == normalized(original)

    inline = graphopt.load(original)
    inline.graph.add_initializer(graphopt.ir.ArrayTensor(np.ones((64, 64), np.float32), "big"))
    graphopt.save(inline, tmp_path / "forced.onnx", external_data=True)
    proto = onnx.load(tmp_path / "forced.onnx", load_external_data=False)
    tensors = {t.name: t for t in proto.graph.initializer}
    assert tensors["big"].data_location == T.EXTERNAL and tensors["W"].data_location != T.EXTERNAL
    reloaded = onnx.load(tmp_path / "forced.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in reloaded.graph.initializer
                                                             if t.name == "big")), np.ones((64, 64)))
    del reloaded.graph.initializer[-1]
    assert normalized(reloaded) == normalized(original)


@pytest.mark.parametrize("external", [False, True])
def test_tensors_a_pass_creates_save_in_every_dtype_and_when_empty(tmp_path, external):
    """Passes hold new weights as numpy arrays; bfloat16/float8 (ml_dtypes) and empty ones have no plain
    buffer to stream, inline or external."""
    arrays = {"bf16": np.arange(40, dtype=np.float32).astype(ml_dtypes.bfloat16),
              "f8": np.linspace(-2, 2, 40, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn),
              "empty": np.zeros((0, 3), np.float32)}
    model = graphopt.load(kitchen_sink())
    for name, array in arrays.items():
        model.graph.add_initializer(graphopt.ir.ArrayTensor(array, name))
    graphopt.save(model, tmp_path / "m.onnx", external_data=external)
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer
             if t.name in arrays}
    for name, array in arrays.items():
        assert saved[name].dtype == array.dtype and saved[name].tobytes() == array.tobytes(), name


def test_models_over_the_protobuf_limit_go_external(tmp_path, monkeypatch):
    import graphopt.onnx_io as io_module

    monkeypatch.setattr(io_module, "PROTOBUF_LIMIT", 50)
    model = graphopt.load(kitchen_sink())
    graphopt.save(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    with pytest.raises(ModelSaveError, match="over 2 GB"):
        graphopt.to_bytes(model)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    model = graphopt.load(kitchen_sink())

    def explode(out):
        out.write(b"partial")
        raise RuntimeError("disk full")

    tensor = model.graph.initializers["W"].const
    monkeypatch.setattr(type(tensor), "raw_length", lambda self: 64)
    monkeypatch.setattr(type(tensor), "write_raw", lambda self, out: explode(out))
    with pytest.raises(RuntimeError, match="disk full"):
        graphopt.save(model, target)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no temp file left


def test_refuses_to_overwrite_its_own_source(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(kitchen_sink(), path)
    before = path.read_bytes()
    with pytest.raises(ModelSaveError, match="reads from it"):
        graphopt.save(graphopt.load(path), path)
    assert path.read_bytes() == before


def test_initializer_listed_as_input_stays_an_overridable_input():
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2]),
                               helper.make_tensor_value_info("b", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "b")])
    original = helper.make_model(graph, ir_version=3, opset_imports=[helper.make_opsetid("", 9)])
    model = graphopt.load(original)
    b = model.graph.initializers["b"]
    assert b.is_graph_input() and b.is_initializer()
    assert normalized(graphopt.to_proto(model)) == normalized(original)


def test_weightless_proto_keeps_small_constants_and_types_big_ones():
    model = graphopt.load(kitchen_sink())
    big = np.zeros((100, 100), np.float32)
    model.graph.add_initializer(graphopt.ir.ArrayTensor(big, "big"))
    proto = to_proto_without_weights(model)
    assert "big" in {i.name for i in proto.graph.input}
    assert "W" in {t.name for t in proto.graph.initializer}
