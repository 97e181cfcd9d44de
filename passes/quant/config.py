"""QuantConfig: every choice ``quantize`` makes, one field each (the CLI maps one flag to one field)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.errors import GraphoptError

MODES = ("static", "dynamic", "weight_only")
METHODS = ("minmax", "percentile", "entropy", "mse")
METRICS = ("cosine", "rel_l2")
ACTIVATION_TYPES = ("uint8", "int8")

# A user metric gets the fp32 and the quantized outputs of every calibration sample (same order, dicts keyed by
# output name) and returns an error: lower is better, compared with ``max_error``.
Metric = Callable[[Sequence[Mapping[str, np.ndarray]], Sequence[Mapping[str, np.ndarray]]], float]


@dataclass
class QuantConfig:
    """How to quantize.

    mode: "static" (QDQ pairs on activations and weights, calibrated ranges; onnxruntime runs int8 kernels),
        "dynamic" (int8 weights, activations quantized at run time: MatMul/Gemm-heavy models such as
        transformers) or "weight_only" (int8 weights + DequantizeLinear, float compute: a smaller file).
    activation_type: "uint8" (fast on every x86 CPU: U8S8) or "int8" (S8S8: slow on CPUs without VNNI).
    per_channel: one weight scale per output channel (else per tensor).
    reduce_range: 7-bit weights (+-63). None: on for x86 CPUs without VNNI, whose U8S8 kernels add pairs of
        u8 x s8 products in saturating int16 (on ResNet here: output cosine 0.995 with 8-bit weights, 0.9999
        with 7-bit ones); in dynamic mode on such CPUs, per-channel 7-bit, per-channel 8-bit and per-tensor
        8-bit weights are each measured and the most accurate is kept (this overrides ``per_channel``).
    symmetric: symmetric activation ranges (zero point at the middle); weights are always symmetric int8.
    method: how activation ranges are chosen from the calibration data: "minmax", "percentile"
        (``percentile`` of |x|), "entropy" (KL divergence, TensorRT-style) or "mse" (the clipping range that
        minimizes the quantization mean squared error).
    max_error: accuracy budget on the model outputs against fp32 over the calibration data (``metric``:
        "cosine" means 1 - mean cosine similarity, "rel_l2" the relative L2 error), or ``user_metric``.
        Layers are kept in float, most sensitive first, until the budget is met. None: quantize everything
        that pays.
    latency_aware: time the quantized model against fp32 here; while it is slower, give up the op kinds
        whose int8 kernels ran slowest alone (``int8_ops.json``); nothing pays: the fp32 model comes back.
    latency_batch: the latency checks time the first calibration sample; with this, that sample repeated
        this many times along the batch (leading) axis, the batch the model will serve: on small models
        int8's gain depends on it (digits CNN here: 1.2-1.3x fp32's speed at batch 1, 1.7x at batch 8).
    op_types: op types to quantize; None means every kind onnxruntime fuses into an int8 kernel here
        (``int8_ops.json``), the latency check then giving up those that do not pay in this model.
    nodes_to_exclude: node names always kept in float.
    calib_samples: use at most this many calibration samples (all of them calibrate the ranges).
    eval_samples: the output error (report, budget) is measured on the first this many of them (in
        dynamic/weight-only mode fewer, but at least 8, when the fp32 model needs over 10 s for them), and
        each layer's sensitivity on the first ``sensitivity_samples``: running every variant on all
        samples would make quantizing a large model take many minutes.
    fuse: run graphopt's fusion pipeline (level "fuse": Conv+BN and friends) first.
    smooth: move the outlier channels of int8 MatMuls' inputs into their weights (SmoothQuant, ``smooth.py``)
        where the int8 product's error, simulated on the calibration data, drops by a fifth or more, and keep
        that only if the model's output error drops by a tenth (static and dynamic modes).
    """

    mode: str = "static"
    activation_type: str = "uint8"
    per_channel: bool = True
    reduce_range: bool | None = None
    symmetric: bool = False
    method: str = "minmax"
    percentile: float = 99.999
    max_error: float | None = None
    metric: str = "cosine"
    user_metric: Metric | None = None
    latency_aware: bool = True
    latency_batch: int | None = None
    op_types: Sequence[str] | None = None
    nodes_to_exclude: Sequence[str] = ()
    calib_samples: int = 256
    eval_samples: int = 32
    sensitivity_samples: int = 16
    fuse: bool = True
    smooth: bool = True
    progress: bool = False
    seed: int = 0

    def check(self) -> None:
        for field, value, allowed in (("mode", self.mode, MODES), ("method", self.method, METHODS),
                                      ("metric", self.metric, METRICS),
                                      ("activation_type", self.activation_type, ACTIVATION_TYPES)):
            if value not in allowed:
                raise GraphoptError(f"unknown {field} {value!r}", hint=f"use one of {', '.join(allowed)}")
        if self.max_error is not None and not self.max_error >= 0:
            raise GraphoptError(f"max_error must be >= 0, got {self.max_error}")
        if self.user_metric is not None and self.max_error is None:
            raise GraphoptError("a user metric needs max_error (the budget it is compared with)")
        if not 0 < self.percentile <= 100:
            raise GraphoptError(f"percentile must be in (0, 100], got {self.percentile}")
        if min(self.calib_samples, self.eval_samples, self.sensitivity_samples) < 1:
            raise GraphoptError("calib_samples, eval_samples and sensitivity_samples must be at least 1")
        if self.latency_batch is not None and self.latency_batch < 1:
            raise GraphoptError(f"latency_batch must be at least 1, got {self.latency_batch}")
