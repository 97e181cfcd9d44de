"""Verify a compiled artifact against onnxruntime running the original ONNX model.

Same inputs, tolerance rule and report as :func:`graphopt.verify.verify_models` (the candidate is
the artifact, run through TVM's VM instead of onnxruntime); there is no bisection, since the
compiled code has no named intermediate values to compare.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.verify import (
    VerificationError,
    VerifyReport,
    check_inputs,
    compare_outputs,
    generate_inputs,
    load_inputs,
    run_model,
)
from graphopt.verify.precision import computed_in
from graphopt.verify.runtime import ModelLike, load_model

from .runtime import ArtifactError, load


def verify_artifact(
    original: ModelLike,
    artifact: str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``original`` in onnxruntime and ``artifact`` (a compiled directory) on the same inputs; judge each output."""
    runner = load(artifact)
    original = load_model(original)  # once: the input checks, the reference run and the precision walk read it
    if isinstance(inputs, str | os.PathLike):
        inputs = load_inputs(inputs)
    feeds = check_inputs(original, inputs) if inputs is not None else generate_inputs(original, shapes, seed)
    report = VerifyReport(ok=False, outputs=[], seed=None if inputs is not None else seed,
                          input_shapes={k: list(v.shape) for k, v in feeds.items()},
                          input_dtypes={k: v.dtype.name for k, v in feeds.items()})
    ref = run_model(original, feeds, label="original model")
    taken = {spec["name"] for spec in runner.inputs}
    if dropped := sorted(set(feeds) - taken):
        report.notes.append(f"the artifact does not take inputs {dropped}")
    try:
        got = runner.run({k: v for k, v in feeds.items() if k in taken})
    except (ArtifactError, VerificationError) as exc:
        report.error = str(exc)
        return report
    report.outputs = compare_outputs(ref, got, rtol, atol, computed_in=computed_in(original.proto))
    report.ok = all(diff.ok for diff in report.outputs)
    return report
