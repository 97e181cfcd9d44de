"""Calibration data for quantization: the three accepted forms, checked against the model's inputs.

The loading and the per-input checks (missing input, wrong dtype kind, wrong rank or static dim, NaN, each
named in one CalibrationError) are the pruning package's: both passes take the same data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from graphopt.ir import Model
from graphopt.onnx_io import to_proto_without_weights
from graphopt.passes.prune.calib import CalibrationError, CalibSource
from graphopt.passes.prune.calib import load_calibration as _load_checked

__all__ = ["CalibSource", "CalibrationError", "load_calibration"]


def load_calibration(source: CalibSource | Iterable[Mapping[str, np.ndarray]], model: Model | onnx.ModelProto,
                     limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Checked samples (at most ``limit``): a ``.npz`` path (arrays keyed by input name, samples stacked on a
    new leading axis), a folder of ``.npz`` (one sample each; shapes may differ) or an iterable of feed dicts.

    Raises CalibrationError naming the input for a missing input, a wrong dtype, a wrong rank or NaN.
    """
    return _load_checked(source, model if isinstance(model, onnx.ModelProto) else interface(model), limit)


def interface(model: Model) -> onnx.ModelProto:
    """A weightless proto whose graph inputs are exactly what a caller feeds (no initializer-backed ones)."""
    proto = to_proto_without_weights(model, max_inline_bytes=0)
    fed = {v.name for v in model.graph.inputs if v.const is None}
    keep = [vi for vi in proto.graph.input if vi.name in fed]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    return proto
