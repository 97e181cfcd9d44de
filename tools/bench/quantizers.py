"""Quantizers compared by ``tools/bench_quant.py``: each reads a model path and a calibration folder (one
``.npz`` per sample, see :mod:`.quant_data`) and writes a quantized model path.

Every adapter does the whole job a user would (load, calibrate, quantize, save), because that is what is
timed; each runs inside a :mod:`tools.bench.child` process, one tool per process, so a crash costs one row.
onnxruntime's quantizers get the preprocessing step its documentation asks for (``quant_pre_process``:
shape inference and graph optimization such as Conv+BatchNorm folding); when that step fails the tool
quantizes the original model and says so in its result.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .quant_data import read_calibration

#: graphopt method name -> onnxruntime CalibrationMethod name; onnxruntime has no MSE-optimal clipping.
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def run_graphopt(src: str, dst: str, calib_dir: str, mode: str, method: str, latency_batch: int) -> dict[str, Any]:
    """graphopt's quantizer with its defaults for ``mode``, apart from the calibration ``method`` and the batch
    its latency check times: the one the benchmark measures latency at, as a user would give it."""
    import graphopt
    from graphopt.passes.quant import QuantConfig, quantize

    config = QuantConfig(mode=mode, method=method, latency_batch=latency_batch)
    model, report = quantize(src, calib_dir, config=config)
    graphopt.save(model, dst)
    data = report.to_dict()
    reasons: dict[str, int] = {}
    for node in data.get("kept_float", []):
        reasons[node["reason"]] = reasons.get(node["reason"], 0) + 1
    return {"method": data.get("method"), "quantized_nodes": data.get("quantized_nodes"),
            "kept_float": reasons, "output_error": data.get("output_error"), "timings_s": data.get("timings_s"),
            "notes": data.get("notes")}


def run_ort_static(src: str, dst: str, calib_dir: str, activation: str, method: str) -> dict[str, Any]:
    """``quantize_static``: QDQ, int8 per-channel weights, ``activation`` ("uint8": U8S8 or "int8": S8S8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ort_method = ORT_METHODS.get(method, "MinMax")  # see the note in the result
    with _preprocessed(src) as (model, note):
        quantize_static(model, dst, _Reader(calib_dir), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod[ort_method])
    if method not in ORT_METHODS:
        note = "; ".join(filter(None, [note, f"onnxruntime has no {method} calibration: used MinMax"]))
    return {"method": ort_method, "note": note}


def run_ort_dynamic(src: str, dst: str, calib_dir: str, per_channel_matmul: bool = False) -> dict[str, Any]:
    """``quantize_dynamic`` with its defaults, or per-channel on MatMul only. Uses no calibration data."""
    from onnxruntime.quantization import quantize_dynamic

    del calib_dir  # same signature as the others; dynamic quantization needs no data
    options: dict[str, Any] = {"per_channel": True, "op_types_to_quantize": ["MatMul"]} if per_channel_matmul else {}
    with _preprocessed(src) as (model, note):
        quantize_dynamic(model, dst, **options)
    return {"note": note}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a calibration folder (``get_next`` until None)."""

    def __init__(self, calib_dir: str) -> None:
        self._samples: Iterator[dict[str, Any]] = iter(read_calibration(calib_dir))

    def get_next(self) -> dict[str, Any] | None:
        return next(self._samples, None)


@contextmanager
def _preprocessed(src: str) -> Iterator[tuple[str, str | None]]:
    """``quant_pre_process(src)`` into a temporary file; yields (path to quantize, note or None).

    When symbolic shape inference fails, retry without it, as onnxruntime's documentation advises; when
    that fails too, quantize the original.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="ort-quant-pre-") as tmp:
        out = os.path.join(tmp, "pre.onnx")
        failures = []
        for skip_symbolic_shape in (False, True):
            try:
                quant_pre_process(src, out, skip_symbolic_shape=skip_symbolic_shape)
            except Exception as exc:  # noqa: BLE001 - the documented step failed: note it and go on
                failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}")
                continue
            yield out, f"quant_pre_process needed skip_symbolic_shape ({failures[0]})" if failures else None
            return
        yield src, f"quant_pre_process failed ({'; '.join(failures)}); quantized the original"


#: Imported before timing starts, as a user's process would have them already. onnxruntime's symbolic shape
#: inference pulls in sympy on first use (~5 s here), which would otherwise be charged to the first model.
SHAPE_INFERENCE = "onnxruntime.tools.symbolic_shape_infer"
GRAPHOPT_IMPORTS = ("onnx", "onnxruntime", SHAPE_INFERENCE, "graphopt", "graphopt.passes.quant")
ORT_IMPORTS = ("onnx", "onnxruntime", SHAPE_INFERENCE, "onnxruntime.quantization",
               "onnxruntime.quantization.shape_inference")
#: tool name -> (adapter, fixed keyword arguments, modules to import before timing starts)
TOOLS: dict[str, tuple[Callable[..., dict[str, Any]], dict[str, Any], tuple[str, ...]]] = {
    "graphopt_static": (run_graphopt, {"mode": "static"}, GRAPHOPT_IMPORTS),
    "graphopt_dynamic": (run_graphopt, {"mode": "dynamic"}, GRAPHOPT_IMPORTS),
    "ort_static_u8s8": (run_ort_static, {"activation": "uint8"}, ORT_IMPORTS),
    "ort_static_s8s8": (run_ort_static, {"activation": "int8"}, ORT_IMPORTS),
    "ort_dynamic": (run_ort_dynamic, {}, ORT_IMPORTS),
    "ort_dynamic_pc_matmul": (run_ort_dynamic, {"per_channel_matmul": True}, ORT_IMPORTS),
}
GRAPHOPT = tuple(name for name in TOOLS if name.startswith("graphopt"))


def run_tool(tool: str, src: str, dst: str, calib_dir: str, method: str, latency_batch: int = 1) -> dict[str, Any]:
    """Entry point for a child process: quantize ``src`` into ``dst`` (its folder is created) with ``tool``;
    ``method`` is the calibration method every static quantizer uses (see :data:`ORT_METHODS`), and
    ``latency_batch`` the batch latency is measured at (only graphopt's quantizer times anything)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    adapter, fixed, _ = TOOLS[tool]
    takes_method = adapter is not run_ort_dynamic
    extra = {"method": method} if takes_method else {}
    if adapter is run_graphopt:
        extra["latency_batch"] = latency_batch
    return adapter(src, dst, calib_dir, **fixed, **extra)
