"""int8 quantization of ONNX models for onnxruntime's CPU provider, with calibration, an accuracy budget
and a latency check measured on this machine.

    from graphopt.passes.quant import quantize, QuantConfig, load_calibration
    import graphopt

    model, report = quantize("model.onnx", "calib.npz", QuantConfig(mode="static", method="percentile",
                                                                     max_error=0.001, metric="cosine"))
    graphopt.save(model, "model.int8.onnx")
    print(report.to_json())

``calib``: a ``.npz`` path (arrays keyed by input name, samples stacked on a new leading axis), a folder
of ``.npz`` files (one sample each; shapes may differ) or any iterable of ``{input_name: array}`` dicts.
``quantize`` returns ``(graphopt Model, QuantReport)``; the input model is never modified. Modes
(``QuantConfig.mode``): "static" QDQ, "dynamic" (DynamicQuantizeMatMul, for transformers) and
"weight_only". ``report.to_json()`` for machines, ``rich.print(report)`` for people. See
docs/quantize.md for the design and the measurements behind the defaults.
"""

from __future__ import annotations

from .api import quantize
from .calib import CalibrationError, load_calibration
from .config import QuantConfig
from .report import FloatNode, LayerError, QuantReport, render

__all__ = ["CalibrationError", "FloatNode", "LayerError", "QuantConfig", "QuantReport", "load_calibration",
           "quantize", "render"]
