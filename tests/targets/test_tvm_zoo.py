"""Zoo models through TVM: dynamic shapes, transformers, an int8 QDQ CNN, each against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from graphopt.targets.tvm import compile_model, load  # noqa: E402
from graphopt.targets.tvm.frontend import UnsupportedModelError  # noqa: E402
from graphopt.verify import run_model  # noqa: E402
from tests.targets.tvm_models import assert_matches, ort_outputs  # noqa: E402

pytestmark = pytest.mark.xdist_group("tvm")


def test_vit_compiles_once_with_a_symbolic_batch_and_runs_at_two_sizes(zoo, tmp_path):
    path = zoo.build("vit_dynamo")
    result = compile_model(path, tmp_path / "vit")
    assert result.manifest["inputs"][0]["shape"] == ["batch", 3, 32, 32]
    runner = load(result.path)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = runner(x)
        assert got["last_hidden_state"].shape[0] == batch
        assert_matches(ort_outputs(path, {"pixel_values": x}), got)


@pytest.mark.slow
def test_minilm_at_two_sequence_lengths_matches_onnxruntime(zoo, tmp_path):
    """TVM's importer cannot follow MiniLM/BERT's symbolic mask arithmetic (checked below), so each
    sequence length is its own static compile; real sentences, real weights."""
    path = zoo.build("minilm_dynamo")
    data = zoo.load_data("minilm_dynamo")
    with pytest.raises(UnsupportedModelError, match="TVM's ONNX importer failed converting a Reshape node"):
        compile_model(path, tmp_path / "dynamic")
    for seq in (8, 16):
        feeds = {k: np.ascontiguousarray(data[k][:1, :seq]) for k in ("input_ids", "attention_mask")}
        result = compile_model(path, tmp_path / f"seq{seq}", shapes={k: [1, seq] for k in feeds})
        assert_matches(ort_outputs(path, feeds), load(result.path)(**feeds))


def test_int8_qdq_cnn_matches_onnxruntime(zoo, tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = zoo.load_data("digits_cnn_dynamo")["images"].astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": data[i:i + 1]} for i in range(32)])

        def get_next(self):
            return next(self.batches, None)

    qdq = tmp_path / "digits_qdq.onnx"
    quantize_static(str(zoo.build("digits_cnn_dynamo")), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(qdq).graph.node}
    result = compile_model(qdq, tmp_path / "qdq", shapes={"images": [16, 1, 8, 8]})
    x = data[100:116]
    got = load(result.path)(x)["logits"]
    # The QDQ graph as written (onnxruntime without graph rewrites: float math on dequantized values, as TVM
    # computes it): equal up to a rounding tie, one step of the output's quantization scale.
    exact = run_model(str(qdq), {"images": x})["logits"]
    step = float(np.abs(exact).max()) / 127
    assert np.abs(exact - got).max() <= 1.01 * step
    # onnxruntime's optimized session runs fused int8 kernels whose roundings differ layer by layer:
    # the predictions agree.
    fused = ort_outputs(qdq, {"images": x})["logits"]
    assert (fused.argmax(1) == got.argmax(1)).mean() >= 0.9
