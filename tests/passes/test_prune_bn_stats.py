"""BatchNorm statistics re-estimated after pruning: BN nodes and BN folded into convs, on zoo models."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rich.console import Console

import graphopt
import graphopt.cli
from graphopt.ir import verify
from graphopt.passes.prune import PruneConfig, prune
from graphopt.passes.prune.calib import run_exposed
from graphopt.passes.prune.renorm import Moments, RenormResult, RenormTarget, correct
from graphopt.passes.prune.report import PruneReport, render


@pytest.fixture(scope="module")
def digits(zoo):
    from tools.zoo.data import digits_split

    return {"calib": {"images": digits_split(0)["train_images"][:256]}, "test": zoo.load_data("digits_cnn_torchscript")}


def channel_moments(proto: onnx.ModelProto, name: str, feeds: dict, channels=None) -> tuple[np.ndarray, np.ndarray]:
    moments = Moments(channels=channels)
    for values in run_exposed(proto, [name], [feeds]):
        moments.add(values[name])
    return moments.mean_std()


def held_out_sqnr(original: str, pruned: bytes, images: np.ndarray) -> float:
    ref = ort.InferenceSession(original, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    got = ort.InferenceSession(pruned, providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


@pytest.mark.parametrize("name, kind", [("digits_cnn_torchscript", "batchnorm"), ("digits_cnn_dynamo", "folded")])
def test_pruned_channels_get_the_unpruned_moments_back(zoo, digits, name, kind):
    """With BN re-estimation alone (no refit), every corrected layer's channels have, on the calibration data,
    the mean and std the unpruned model's have, and the held-out output gets closer to the unpruned one."""
    src = str(zoo.build(name))
    original = onnx.load(src)
    plain = graphopt.load(src)
    prune(plain, PruneConfig(flops=0.4))
    model = graphopt.load(src)
    report = prune(model, PruneConfig(flops=0.4, calib=digits["calib"], reconstruct=False))
    verify(model.graph)
    assert not report.refits and kind in {r.kind for r in report.renorms}
    assert max(r.mean_shift for r in report.renorms) > 0.1  # pruning really had moved the statistics
    pruned = graphopt.to_proto(model)
    feeds = {"images": digits["calib"]["images"]}
    checked = 0
    for node in model.graph:
        if node.label() not in {r.node for r in report.renorms}:
            continue
        out = node.outputs[0].name
        kept_channels = _kept_channels(original, plain, node.label())
        mu_p, sd_p = channel_moments(pruned, out, feeds)
        mu_o, sd_o = channel_moments(original, out, feeds, kept_channels)
        np.testing.assert_allclose(mu_p, mu_o, atol=2e-3 * sd_o.max())
        np.testing.assert_allclose(sd_p, sd_o, rtol=2e-3, atol=1e-4 * sd_o.max())
        checked += 1
    assert checked == len(report.renorms)
    images = digits["test"]["images"]
    assert held_out_sqnr(src, graphopt.to_bytes(model), images) > held_out_sqnr(src, graphopt.to_bytes(plain),
                                                                                 images) + 3


def _kept_channels(original: onnx.ModelProto, plain: graphopt.Model, label: str) -> np.ndarray | None:
    """Original channels a layer kept, read off the data-free run (L1 picks the same channels without data):
    its sliced, uncorrected BN beta or conv bias, looked up in the original's."""
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    node = next(n for n in plain.graph if n.label() == label)
    sliced = node.inputs[2].const.numpy()
    full = weights[next(n for n in original.graph.node if n.output[0] == node.outputs[0].name).input[2]]
    if len(sliced) == len(full):
        return None
    position = {float(v): i for i, v in enumerate(full)}
    return np.array([position[float(v)] for v in sliced])


BN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4, 4] x) => (float[N, 3, 4, 4] y) {
    y = BatchNormalization <epsilon = 0.001> (x, gamma, beta, mean, var)
}
"""


@pytest.mark.parametrize("quieter", [False, True])
def test_batchnorm_correction_matches_moments(quieter):
    """The BN rewrite itself: for a pruned input with other moments, the output moments equal the original
    BN's on the original input, both when a new variance suffices and when gamma has to absorb the scale."""
    proto = onnx.parser.parse_model(BN_MODEL)
    params = {"gamma": [1.5, -0.5, 2.0], "beta": [0.1, 0.2, -0.3], "mean": [0.5, -1.0, 0.0], "var": [2.0, 0.5, 1.0]}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in params.items())
    rng = np.random.default_rng(0)
    x_orig = rng.normal([0.3, -1.2, 0.4], [1.2, 0.8, 1.0], (64, 4, 4, 3)).transpose(0, 3, 1, 2).astype(np.float32)
    scale = [30.0, 0.05, 4.0] if quieter else [0.5, 1.7, 1.1]
    x_pruned = (x_orig * np.array(scale, np.float32)[:, None, None] + 0.7).astype(np.float32)
    model = graphopt.load(proto.SerializeToString())
    bn = next(iter(model.graph))
    pruned, orig = Moments(), Moments()
    pruned.add(x_pruned)
    orig.add(x_orig)
    result = correct(RenormTarget(bn, bn.inputs[0], False), pruned, orig)
    assert result.kind == "batchnorm" and result.mean_shift > 0.1
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                     {"x": x_orig})[0]
    got = ort.InferenceSession(graphopt.to_bytes(model), providers=["CPUExecutionProvider"]).run(None,
                                                                                                   {"x": x_pruned})[0]
    np.testing.assert_allclose(got.mean((0, 2, 3)), want.mean((0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(got.std((0, 2, 3)), want.std((0, 2, 3)), rtol=1e-4)
    var = onnx.numpy_helper.to_array(next(i for i in graphopt.to_proto(model).graph.initializer if i.name == "var"))
    assert (var > 0).all()


def test_too_few_values_per_channel_leave_the_statistics_alone():
    """Two 1x1 samples give each channel two values: re-centred on them, the BN would fit those samples, not
    the data. The BN stays as it was and the report says why; at 64 samples it is corrected."""
    proto = onnx.parser.parse_model(BN_MODEL)
    params = {"gamma": [1.5, -0.5, 2.0], "beta": [0.1, 0.2, -0.3], "mean": [0.5, -1.0, 0.0], "var": [2.0, 0.5, 1.0]}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in params.items())
    rng = np.random.default_rng(0)
    for samples, applied in ((2, False), (64, True)):
        model = graphopt.load(proto.SerializeToString())
        bn = next(iter(model.graph))
        pruned, orig = Moments(), Moments()
        pruned.add(rng.normal(1.0, 2.0, (samples, 3, 1, 1)))
        orig.add(rng.normal(0.0, 1.0, (samples, 3, 1, 1)))
        result = correct(RenormTarget(bn, bn.inputs[0], False), pruned, orig)
        assert (result.applied, result.values) == (applied, samples)
        unchanged = graphopt.to_proto(model).graph.initializer == proto.graph.initializer
        assert unchanged != applied
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(render(PruneReport(1.0, 1.0, 1.0, 1.0, 0.0, "t", "l1", renorms=[
        RenormResult("bn", "batchnorm", 0.5, 1.0, values=2, applied=False)])))
    line = " ".join(console.export_text().split())
    assert "left as they were at 1 layers (bn, ...): 2 values per channel" in line


def test_cli_bn_stats_without_refit(zoo, tmp_path, capsys, digits):
    src = str(zoo.build("digits_cnn_torchscript"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=digits["calib"]["images"][:64])
    argv = ["prune", src, "-o", str(tmp_path / "p.onnx"), "--flops", "0.5", "--calib", str(calib), "--json"]
    assert graphopt.cli.main([*argv, "--no-reconstruct"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["reconstructed"]
    assert sorted(r["kind"] for r in report["renorms"]) == ["batchnorm"] * 3 + ["folded"]  # + the hidden Gemm
    assert graphopt.cli.main([*argv, "--bn-stats", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reconstructed"] and not report["renorms"]
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        graphopt.cli.main([*argv, "--bn-stats", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
