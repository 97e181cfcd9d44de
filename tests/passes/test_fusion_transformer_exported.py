"""LayerNorm, RMSNorm and activations written by hand in PyTorch (as T5/LLaMA-style code does), exported by
both exporters: the decomposed forms real exporters write must fuse, and match the original in
onnxruntime at two shapes. The dynamo exporter takes 10-30 s per module, so those cases are slow."""

from __future__ import annotations

import importlib
import io
from collections import Counter

import numpy as np
import pytest

import graphopt
from graphopt.verify import verify_models

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
for _module in ("norm", "gelu"):
    importlib.import_module(f"graphopt.passes.fusion.{_module}")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PASSES = ["lift-constants", "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "fuse-silu", "eliminate-dead-nodes",
          "remove-unused-initializers"]


class ManualLayerNorm(torch.nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.g, self.b = torch.nn.Parameter(torch.randn(d)), torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.g + self.b


class LlamaRMSNorm(torch.nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Activations(torch.nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        f = torch.nn.functional
        h = self.fc(x)
        return f.silu(x) + f.gelu(h, approximate="tanh") + f.gelu(h)


CASES = {  # module, fused ops expected (by type, count)
    "layer_norm": (ManualLayerNorm, {"LayerNormalization": 1}),
    "rms_norm": (LlamaRMSNorm, {"SimplifiedLayerNormalization": 1}),
    "activations": (Activations, {"QuickGelu": 1, "FastGelu": 1, "Gelu": 1}),
}


def export(module: torch.nn.Module, dynamo: bool) -> onnx.ModelProto:
    x = torch.randn(2, 5, 16)
    if dynamo:
        dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
        return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=dims, opset_version=18).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
def test_exported_decompositions_fuse(case: str, exporter: str):
    torch.manual_seed(0)
    module_type, expected = CASES[case]
    original = export(module_type().eval(), exporter == "dynamo")
    model = graphopt.load(original)
    graphopt.optimize(model, PASSES)
    ops = Counter(n.op_type for n in model.graph)
    assert {op: ops[op] for op in expected} == expected, ops
    assert not ops.keys() & {"ReduceMean", "Sqrt", "Erf", "Tanh", "Sigmoid", "Pow"}, ops
    x_input = original.graph.input[0].name
    for shape in ((2, 5, 16), (3, 9, 16)):
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 2
        report = verify_models(original, graphopt.to_bytes(model), inputs={x_input: x})
        assert report.ok, report.summary()
