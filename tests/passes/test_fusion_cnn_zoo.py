"""The conv/linear/activation/transpose fusions on every zoo model: outputs match the original in onnxruntime at
the zoo's primary and second input shapes, what fires is what we expect, and nothing else changes."""

from __future__ import annotations

import pytest

import graphopt
import graphopt.passes.fusion.activation
import graphopt.passes.fusion.conv
import graphopt.passes.fusion.linear
import graphopt.passes.fusion.transpose  # noqa: F401 - registration
from tests.passes.test_fusion_support import assert_same_outputs
from tools.zoo import MODELS, build, make_inputs, small_models

FUSIONS = ["fold-conv-batchnorm", "fold-conv-scale-bias", "fuse-pad-conv", "fold-linear-batchnorm",
           "fold-linear-scale-bias", "matmul-add-to-gemm", "fuse-hard-activations", "sink-transposes"]
PIPELINE = ["lift-constants", *FUSIONS, "eliminate-dead-nodes", "remove-unused-initializers"]

EXPECTED = {  # what fires (everything else: nothing)
    "digits_cnn_torchscript": {"fold-conv-batchnorm": 3},
    "resnet_torchscript": {"fold-conv-batchnorm": 9},
    "mobilenet_torchscript": {"fold-conv-batchnorm": 19},
    "resnet50_torchscript": {"fold-conv-batchnorm": 53},
    "mobilenet_v2_torchscript": {"fold-conv-batchnorm": 52},
    "control_flow": {"matmul-add-to-gemm": 1},
    "external_data": {"matmul-add-to-gemm": 1},
}


def _check(name: str) -> None:
    path = build(name)
    model = graphopt.load(path)
    result = graphopt.optimize(model, PIPELINE)
    fired = {p: s.changes for p, s in result.pipeline.stats.items() if p in FUSIONS and s.changes}
    assert fired == EXPECTED.get(name, {})
    assert not any(n.op_type == "BatchNormalization" for n in model.nodes())
    for second in (False, True):
        assert_same_outputs(str(path), model, make_inputs(MODELS[name], second=second))


SLOW = {"minilm_dynamo", "minilm_torchscript"}  # real 90 MB weights: seconds per verification


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in small_models()])
def test_small_zoo(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_torchscript", "mobilenet_v2_torchscript"])
def test_full_size_cnns(name):
    _check(name)
