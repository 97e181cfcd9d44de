"""The main job as a library call: run a pass pipeline over a model, optionally checking every step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GraphoptError
from .ir import Model
from .ir import verify as verify_ir
from .onnx_io import ModelLike, load, to_bytes
from .pipeline import (
    Instrument,
    NumericsInstrument,
    PassContext,
    PassManager,
    PipelineReport,
    VerifyIRInstrument,
    default_pipeline,
)

# runtimes whose fused operators the fusion passes know; "ort-cpu": onnxruntime's CPU provider on this very
# machine (adds layouts bound to its CPU, e.g. NCHWc blocks sized for its vector width)
TARGET_RUNTIMES = ("ort", "ort-cpu")


@dataclass
class OptimizeResult:
    model: Model
    pipeline: PipelineReport
    nodes_before: int
    nodes_after: int


def optimize(
    model: Model | ModelLike,
    passes: Sequence[str] | None = None,
    *,
    level: str = "fuse",
    target_runtime: str = "ort",
    disable: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    verify_each: bool = False,
    inputs: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    max_iterations: int = 10,
    instruments: Sequence[Instrument] = (),
) -> OptimizeResult:
    """Optimize ``model`` in place (a path/bytes/ModelProto is loaded first).

    ``passes`` defaults to every lossless pass up to ``level`` ("simplify": only
    remove and fold redundancy; "fuse": also introduce fused operators for
    ``target_runtime``, whose choices were measured in that runtime). With ``verify_each``, after
    every pass that changed something the IR is checked and the outputs are
    compared with the original's in onnxruntime (on ``inputs``, or inputs
    generated for ``shapes``); the first pass that breaks either is named in
    the PassBrokeGraph error.
    """
    model = load(model)
    verify_ir(model)
    all_instruments = list(instruments)
    if verify_each:
        from .verify import generate_inputs

        original = model.source_path or to_bytes(model)  # (a model over 2 GB comes from a path)
        feeds = dict(inputs) if inputs is not None else generate_inputs(original, shapes=shapes)
        all_instruments += [VerifyIRInstrument(), NumericsInstrument(original, feeds)]
    if target_runtime not in TARGET_RUNTIMES:
        raise GraphoptError(f"unknown target runtime {target_runtime!r}",
                            hint=f"one of: {', '.join(TARGET_RUNTIMES)}")
    ctx = PassContext(config={"target-runtime": target_runtime, **(config or {})}, instruments=all_instruments,
                      disabled=set(disable), max_iterations=max_iterations)
    before = sum(1 for _ in model.nodes())
    report = PassManager(passes if passes is not None else default_pipeline(level), ctx).run(model)
    return OptimizeResult(model, report, before, sum(1 for _ in model.nodes()))
