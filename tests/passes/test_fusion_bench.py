"""tools/bench_fusion.py on a tiny zoo CNN, shrunk: every variant made, checked, timed and judged."""

from __future__ import annotations

import pytest

from tools.bench.pairing import paired_ratio
from tools.bench_fusion import (
    BenchConfig,
    bench_feeds,
    bench_model,
    render_markdown,
    targets,
)
from tools.zoo import build


def test_paired_ratio_uses_same_round_pairs():
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 4.0, 2.0]) == 2.0  # per round: 2, 1, 3
    assert paired_ratio([], []) is None


def test_bench_feeds_set_batch_and_sequence():
    feeds = bench_feeds("bert_torchscript", 8, 128)
    assert feeds["input_ids"].shape == (8, 128) and feeds["attention_mask"].shape == (8, 128)
    assert bench_feeds("resnet_torchscript", 8, 128)["images"].shape == (8, 3, 64, 64)


def _result(graphopt: float, onnxsim: float, control: float) -> dict:
    cell = lambda x: {"b1": {"all": {"cpu_x_all": x}}}  # noqa: E731
    return {"model": "digits_cnn_dynamo", "control": cell(control),
            "variants": {"original": {"latency": cell(1.0)}, "graphopt": {"latency": cell(graphopt)},
                         "onnxsim": {"latency": cell(onnxsim)}}}


def test_targets_treat_ratios_within_the_noise_as_equal():
    assert targets(_result(1.004, 0.997, control=1.000))["b1"]["all_le_simplifiers"]  # the floor, not 0 noise
    assert not targets(_result(1.03, 0.997, control=1.000))["b1"]["all_le_simplifiers"]
    assert targets(_result(1.03, 0.997, control=0.96))["b1"]["all_le_original"]  # a noisy run allows more
    assert not targets(_result(1.03, 0.997, control=0.99))["b1"]["all_le_original"]


@pytest.mark.slow
def test_bench_model_on_a_small_cnn(tmp_path):
    cfg = BenchConfig(batches=(1, 2), runs=2, warmup=1, min_seconds=0.5, creation_repeat=1, timeout=300)
    result = bench_model("digits_cnn_torchscript", build("digits_cnn_torchscript"), tmp_path, cfg)
    variants = result["variants"]
    assert {"original", "onnxsim", "onnxslim", "graphopt"} <= set(variants)
    assert "ort_transformers" not in variants  # a CNN
    for label, variant in variants.items():
        assert variant["ok"], (label, variant["error"])
        assert label == "original" or variant["matched"], variant.get("match")
        for batch in ("b1", "b2"):
            for level in ("all", "basic"):
                assert variant["latency"][batch][level]["x_all"] > 0
                assert variant["latency"][batch][level]["runs"] > 2  # min_seconds added rounds (tiny model)
        assert set(variant["creation_s"]) == {"all", "basic"}
    assert variants["original"]["latency"]["b1"]["all"]["x_all"] == 1.0
    judged = targets(result, "wall")
    assert judged["b1"]["judge"] == "wall" and "all_le_original" in judged["b1"]
    assert "digits_cnn_torchscript" in render_markdown([result], "cmd")


def test_main_removes_its_temporary_variants(tmp_path, monkeypatch):
    """One run of the benchmark wrote 12 GB of variants to /tmp and left them there."""
    import tempfile

    import tools.bench_fusion as bench

    seen = []

    def fake_bench_model(name, src, workdir, cfg, judge):
        (workdir / name).mkdir(parents=True)
        (workdir / name / "model.onnx").write_bytes(b"x" * 1024)
        seen.append(workdir / name)
        return {"model": name, "error": "fake"}

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr("tools.zoo.build", lambda name: f"{name}.onnx")
    bench.main(["--only", "digits_cnn_dynamo", "digits_cnn_torchscript"])
    assert len(seen) == 2 and not any(p.exists() for p in seen)
    assert list(tmp_path.iterdir()) == []

    kept = tmp_path / "kept"
    bench.main(["--only", "digits_cnn_dynamo", "--workdir", str(kept)])
    assert (kept / "digits_cnn_dynamo" / "model.onnx").exists()  # asked for: kept
