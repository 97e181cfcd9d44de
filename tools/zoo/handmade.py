"""Models written directly in ONNX: control flow (If, Loop, Scan) and a model with external data.

Each comes with a numpy reference implementation, checked in onnxruntime at build time, so the
files are known to compute what their docstrings say.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .spec import ZooModel, make_inputs

OPSET = 18
FLOAT = TensorProto.FLOAT


def _init(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _vi(name: str, elem: int, shape: list[Any] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _finish(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt-zoo", doc_string=doc
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_close(name: str, got: list[np.ndarray], want: list[np.ndarray], atol: float = 1e-4) -> float:
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape or not np.allclose(g, w, atol=atol, rtol=atol):
            raise AssertionError(
                f"{name}: output #{i} disagrees with the numpy reference (shapes {g.shape} vs {w.shape})"
            )
        worst = max(worst, float(np.abs(g - w).max()) if g.size else 0.0)
    return worst


# ------------------------------------------------------------------------------------------ control flow


def _if_graph() -> onnx.NodeProto:
    """If on sum(h) > 0; both branches read ``h`` and an initializer from the outer scope."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["h_relu"]), helper.make_node("Mul", ["h_relu", "alpha"], ["then_out"])],
        "then_branch",
        [],
        [_vi("then_out", FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Tanh", ["h"], ["h_tanh"]), helper.make_node("Sub", ["h_tanh", "b"], ["else_out"])],
        "else_branch",
        [],
        [_vi("else_out", FLOAT, None)],
    )
    return helper.make_node("If", ["positive"], ["y_if"], then_branch=then_g, else_branch=else_g)


def _loop_body() -> onnx.GraphProto:
    """v <- 0.5 v + f_i(v W), f_i = tanh on even iterations, alpha*relu on odd ones (a nested If).

    Reads W and alpha from the main graph (two scopes up for the nested If) and emits sum(v) per step.
    """
    even = helper.make_graph(
        [helper.make_node("Tanh", ["mv"], ["even_out"])], "even", [], [_vi("even_out", FLOAT, None)]
    )
    odd = helper.make_graph(
        [helper.make_node("Relu", ["mv"], ["mv_relu"]), helper.make_node("Mul", ["mv_relu", "alpha"], ["odd_out"])],
        "odd",
        [],
        [_vi("odd_out", FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["v", "W"], ["mv"]),
        helper.make_node("Mod", ["iter", "two"], ["parity"]),
        helper.make_node("Equal", ["parity", "zero_i"], ["is_even"]),
        helper.make_node("If", ["is_even"], ["step"], then_branch=even, else_branch=odd),
        helper.make_node("Mul", ["v", "half"], ["v_half"]),
        helper.make_node("Add", ["v_half", "step"], ["v_next"]),
        helper.make_node("Identity", ["cond"], ["cond_out"]),
        helper.make_node("ReduceSum", ["v_next"], ["trace"], keepdims=0),
    ]
    inputs = [_vi("iter", TensorProto.INT64, []), _vi("cond", TensorProto.BOOL, []), _vi("v", FLOAT, ["batch", 4])]
    outputs = [_vi("cond_out", TensorProto.BOOL, []), _vi("v_next", FLOAT, ["batch", 4]), _vi("trace", FLOAT, [])]
    return helper.make_graph(nodes, "loop_body", inputs, outputs)


def _scan_body() -> onnx.GraphProto:
    """Running sum over rows: state acc, scan output acc after each row."""
    nodes = [
        helper.make_node("Add", ["acc", "row"], ["acc_next"]),
        helper.make_node("Identity", ["acc_next"], ["acc_out"]),
    ]
    return helper.make_graph(
        nodes,
        "scan_body",
        [_vi("acc", FLOAT, [4]), _vi("row", FLOAT, [4])],
        [_vi("acc_next", FLOAT, [4]), _vi("acc_out", FLOAT, [4])],
    )


def control_flow_model(cfg: Mapping[str, Any]) -> onnx.ModelProto:
    rng = np.random.default_rng(cfg["seed"])
    inits = [
        _init("W", rng.standard_normal((4, 4)) * 0.5),
        _init("b", rng.standard_normal(4) * 0.1),
        _init("alpha", 1.5),
        _init("zero_f", 0.0),
        _init("half", 0.5),
        _init("acc0", np.zeros(4)),
        _init("trips", cfg["trips"], np.int64),
        _init("true", True, np.bool_),
        _init("two", 2, np.int64),
        _init("zero_i", 0, np.int64),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["h_sum"], keepdims=0),
        helper.make_node("Greater", ["h_sum", "zero_f"], ["positive"]),
        _if_graph(),
        helper.make_node("Loop", ["trips", "true", "y_if"], ["loop_v", "loop_trace"], body=_loop_body()),
        helper.make_node(
            "Scan", ["acc0", "loop_v"], ["scan_final", "scan_cumsum"], body=_scan_body(), num_scan_inputs=1
        ),
    ]
    outputs = [
        _vi("y_if", FLOAT, ["batch", 4]),
        _vi("loop_v", FLOAT, ["batch", 4]),
        _vi("loop_trace", FLOAT, [cfg["trips"]]),
        _vi("scan_final", FLOAT, [4]),
        _vi("scan_cumsum", FLOAT, ["batch", 4]),
    ]
    graph = helper.make_graph(nodes, "control_flow", [_vi("x", FLOAT, ["batch", 4])], outputs, inits)
    return _finish(graph, "If with outer-scope reads, Loop with a carried value and a nested If, Scan")


def control_flow_reference(x: np.ndarray, model: onnx.ModelProto) -> list[np.ndarray]:
    """What the control-flow graph computes, in numpy."""
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    h = x @ p["W"] + p["b"]
    y_if = np.maximum(h, 0) * p["alpha"] if h.sum() > 0 else np.tanh(h) - p["b"]
    v, trace = y_if, []
    for i in range(int(p["trips"])):
        mv = v @ p["W"]
        v = v * 0.5 + (np.tanh(mv) if i % 2 == 0 else np.maximum(mv, 0) * p["alpha"])
        trace.append(v.sum())
    cumsum = np.cumsum(v, axis=0)
    final = cumsum[-1] if len(cumsum) else np.zeros(4, np.float32)
    return [y_if, v, np.asarray(trace, np.float32), final, cumsum]


def build_control_flow(model: ZooModel, path: Path) -> dict[str, Any]:
    """Save the control-flow model and check it on enough seeds to take both If branches."""
    import onnxruntime as ort

    proto = control_flow_model(model.config)
    onnx.save_model(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, branches = 0.0, set()
    for seed in range(8):
        feeds = make_inputs(model, second=bool(seed % 2), seed=seed)
        want = control_flow_reference(feeds["x"], proto)
        worst = max(worst, _assert_close(model.name, session.run(list(model.outputs), feeds), want))
        branches.add(bool((feeds["x"] @ _weights(proto)["W"] + _weights(proto)["b"]).sum() > 0))
    if branches != {True, False}:
        raise AssertionError(f"{model.name}: verification inputs exercised only one If branch")
    return {"max_abs_err": worst}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ----------------------------------------------------------------------------------------- external data


def mlp_model(cfg: Mapping[str, Any]) -> onnx.ModelProto:
    """features -> Gemm/Relu -> MatMul/Add/Relu -> Gemm -> Softmax, random weights."""
    rng = np.random.default_rng(cfg["seed"])
    d_in, hidden, d_out = cfg["sizes"]
    inits = [
        _init("fc1.weight", rng.standard_normal((hidden, d_in)) / np.sqrt(d_in)),
        _init("fc1.bias", rng.standard_normal(hidden) * 0.1),
        _init("fc2.weight", rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)),
        _init("fc2.bias", rng.standard_normal(hidden) * 0.1),
        _init("fc3.weight", rng.standard_normal((d_out, hidden)) / np.sqrt(hidden)),
        _init("fc3.bias", rng.standard_normal(d_out) * 0.1),
    ]
    nodes = [
        helper.make_node("Gemm", ["features", "fc1.weight", "fc1.bias"], ["z1"], transB=1),
        helper.make_node("Relu", ["z1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "fc2.weight"], ["m2"]),
        helper.make_node("Add", ["m2", "fc2.bias"], ["z2"]),
        helper.make_node("Relu", ["z2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "fc3.weight", "fc3.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_vi("features", FLOAT, ["batch", d_in])],
        [_vi("logits", FLOAT, ["batch", d_out]), _vi("probabilities", FLOAT, ["batch", d_out])],
        inits,
    )
    return _finish(graph, "MLP whose large initializers live in an external .data file")


def mlp_reference(x: np.ndarray, w: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    a1 = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    a2 = np.maximum(a1 @ w["fc2.weight"] + w["fc2.bias"], 0)
    logits = a2 @ w["fc3.weight"].T + w["fc3.bias"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return [logits, e / e.sum(-1, keepdims=True)]


def build_external_data(model: ZooModel, path: Path) -> dict[str, Any]:
    """Save with weights >= 1 KiB in ``<name>.onnx.data`` (small biases stay inline), then verify."""
    import onnxruntime as ort

    proto = mlp_model(model.config)
    weights = _weights(proto)
    location = f"{path.name}.data"
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    if not (path.parent / location).is_file():
        raise AssertionError(f"{model.name}: onnx.save_model did not write {location}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for second in (False, True):
        feeds = make_inputs(model, second=second, seed=1)
        got = session.run(list(model.outputs), feeds)
        worst = max(worst, _assert_close(model.name, got, mlp_reference(feeds["features"], weights)))
    return {"max_abs_err": worst, "external_data": location}
