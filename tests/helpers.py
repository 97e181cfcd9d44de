"""Small helpers for tests: models from ONNX text, onnxruntime runs, proto comparison."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from google.protobuf import json_format


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4  # failures surface as exceptions; the C++ log would only repeat them
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def normalized(message) -> dict:
    """A proto as a dict without default-valued fields (proto2 presence aside) and with
    value_info as a name-keyed mapping (order is not meaningful there)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _strip(data)


def _strip(data):
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            value = _strip(value)
            if value in ("", 0, [], {}, "0", None):
                continue
            if key == "value_info" and isinstance(value, list):
                value = {v["name"]: v for v in value}
            out[key] = value
        return out
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def export_torch(module, args: tuple, path, exporter: str, input_names: list[str],
                 dynamic_axes: dict | None = None) -> None:
    """Export ``module`` at opset 18 with the dynamo or the TorchScript exporter, quietly (both print a lot):
    dynamo with its optimizer and weights inline, TorchScript with ``dynamic_axes``: "torchscript" keeps
    BatchNormalization nodes (PRESERVE, as the zoo does), "torchscript-eval" is that exporter's default (BN
    folded into the convs, equal initializers shared through Identity nodes)."""
    import contextlib
    import io
    import warnings

    import torch

    with contextlib.ExitStack() as quiet:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        quiet.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        quiet.enter_context(torch.no_grad())
        if exporter == "dynamo":
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, input_names=input_names,
                              external_data=False, optimize=True)
        else:
            mode = torch.onnx.TrainingMode.PRESERVE if exporter == "torchscript" else torch.onnx.TrainingMode.EVAL
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=18, input_names=input_names,
                              dynamic_axes=dynamic_axes, training=mode)
