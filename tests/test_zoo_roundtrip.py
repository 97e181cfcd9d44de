"""On every (small) zoo model: a load+save round trip is lossless, and the default pipeline
keeps the outputs, at the primary and at a second valid input shape."""

from __future__ import annotations

import onnx
import pytest

import graphopt
from graphopt.optimize import optimize
from graphopt.verify import verify_models
from tests.helpers import normalized, run
from tools.zoo import MODELS, build, make_inputs, small_models

NAMES = [n for n in small_models() if MODELS[n].skip_reason is None]
FULL = [n for n, m in MODELS.items() if m.full_size and m.skip_reason is None]


@pytest.mark.parametrize("name", NAMES + [pytest.param(n, marks=pytest.mark.slow) for n in FULL])
def test_round_trip_is_lossless(name, tmp_path):
    source = build(name)
    out = tmp_path / "copy.onnx"
    graphopt.save(graphopt.load(source), out)
    assert normalized(onnx.load(out)) == normalized(onnx.load(source))
    feeds = make_inputs(MODELS[name])
    for expected, got in zip(run(str(source), feeds), run(str(out), feeds), strict=True):
        if isinstance(expected, list):  # ZipMap: a list of dicts
            assert expected == got
        else:
            assert expected.dtype == got.dtype and expected.shape == got.shape
            assert expected.tobytes() == got.tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_default_pipeline_keeps_outputs(name, tmp_path):
    source = build(name)
    model = graphopt.load(source)
    result = optimize(model)
    assert result.pipeline.converged
    assert result.nodes_after <= result.nodes_before
    assert [v.name for v in model.graph.outputs] == [v.name for v in graphopt.load(source).graph.outputs]
    out = tmp_path / "opt.onnx"
    graphopt.save(model, out)
    spec = MODELS[name]
    shapes = [False, True] if any(i.is_dynamic for i in spec.inputs.values()) else [False]
    for second in shapes:
        report = verify_models(str(source), str(out), inputs=make_inputs(spec, second=second))
        assert report.ok, report
