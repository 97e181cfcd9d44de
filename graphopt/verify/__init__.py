"""Numerical verification: does a transformed model compute what the original computes?

Both models run in onnxruntime (CPU, ``ORT_DISABLE_ALL``, so the reference is
the graph as written, not onnxruntime's rewrite of it) on the same inputs,
generated from the original's signature (:func:`generate_inputs`) or given by
the user (a dict or an ``.npz`` file, :func:`load_inputs`). Outputs are matched
by name and each gets a verdict; on failure, :func:`find_divergence` bisects
to the first node whose output differs.

The tolerance rule
------------------
Integers, bools and strings must be equal. Shapes and dtypes must be equal.
NaN and +-Inf must appear at the same positions. For finite float elements,
with ``err = |got - ref|``:

1. **match** if every element satisfies ``err <= atol + rtol * |ref|``, with
   dtype defaults float64 (1e-7, 1e-9), float32 (1e-4, 1e-5), float16
   (1e-2, 1e-3), bfloat16 (2e-2, 1e-2), or the caller's explicit rtol/atol.
2. **float_noise** (still ok) if the elements that fail (1) all satisfy
   ``err <= noise * rms(ref)``, with ``noise = c * eps(dtype)``:
   c = 2**12 for float64, 2**10 for float32 (1.2e-4), 2**5 for float16
   (3.1e-2), 2**3 for bfloat16 (6.3e-2).
3. **mismatch** otherwise.

Why (2): a harmless change in the order of a float sum (fusion, reassociation,
a MatMul split in two, another kernel's blocking) moves each element by a few
ulps *of the terms summed*, not of the result. Where terms cancel and an
element lands near 0 in a tensor of large magnitude, its elementwise relative
error is unbounded although nothing is wrong. The terms' size is not known
from the output, but the output tensor's RMS is a good proxy (for a dot
product of K random terms both scale as sqrt(K) times the terms), and
recursive summation error grows like eps * sqrt(K) relative to that scale,
times a few for the maximum over many elements and for depth.

Measured here (float32, error / RMS): onnxruntime's fused transformer block
(LayerNorm, BiasGelu, FusedMatMul) against the unfused graph ~8 eps; MatMuls
with K = 16..65536 split or re-blocked 5-20 eps. c = 2**10 leaves a ~50x
margin for deeper graphs while still flagging a 1e-3 relative change of a
weight, bias or scale (error / RMS ~1e-3, 8x the bound). The low-precision
types get fewer ulps of slack because their noise is dominated by per-op
rounding rather than accumulation, and the bound must stay well below the
signal. The RMS rather than the max keeps one outlier from loosening the bound
for the whole tensor (a tensor dominated by sentinel values such as -1e9
attention masks still gets a loose bound; its consumers are judged on their
own scale). Explicit ``rtol``/``atol`` replace rule (1); ``noise=0`` turns rule (2) off.

The dtype whose defaults apply is the output's, or a narrower float type its
computation passes through (:mod:`graphopt.verify.precision`): a float32 output
of a model that computes in float16 carries float16 rounding, and where it
rounds is not fixed (onnxruntime's CPU provider runs some float16 ops in
float32 and skips the rounding between them, so moving a Transpose between two
ops moves a rounding).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.verify.bisect import BISECT_CHUNK, Divergence, find_divergence
from graphopt.verify.compare import (
    OutputDiff,
    Tolerance,
    compare_outputs,
    compare_values,
    default_tolerance,
    tolerance_for,
)
from graphopt.verify.errors import VerificationError
from graphopt.verify.inputs import check_inputs, generate_inputs, input_specs, load_inputs
from graphopt.verify.precision import computed_in
from graphopt.verify.report import VerifyReport, describe_divergence, render_report
from graphopt.verify.runtime import LoadedModel, ModelLike, load_model, run_model, unseeded_random_nodes

__all__ = [
    "BISECT_CHUNK",
    "Divergence",
    "ModelLike",
    "OutputDiff",
    "Tolerance",
    "VerificationError",
    "VerifyReport",
    "check_inputs",
    "compare_outputs",
    "compare_values",
    "default_tolerance",
    "describe_divergence",
    "find_divergence",
    "generate_inputs",
    "load_inputs",
    "reference_outputs",
    "render_report",
    "run_model",
    "tolerance_for",
    "verify_models",
]

logger = logging.getLogger(__name__)


def reference_outputs(
    original: ModelLike | LoadedModel, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The original model's outputs on ``inputs``, computed once so that every
    later candidate (e.g. after each pass) is compared with :func:`compare_outputs`
    or ``verify_models(..., reference=...)`` without rerunning the original.
    """
    return run_model(original, check_inputs(original, inputs), label="original model")


def verify_models(
    original: ModelLike,
    candidate: ModelLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    value_ranges: Mapping[str, tuple[float, float]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    noise: float | None = None,
    seed: int = 0,
    bisect: bool = True,
    reference: Mapping[str, np.ndarray] | None = None,
) -> VerifyReport:
    """Run both models on the same inputs and judge every output of the original.

    Inputs are ``inputs`` if given (a dict or an ``.npz`` path, checked against the original's signature),
    else generated with ``shapes``/``dims``/``value_ranges``/``seed`` (see
    :func:`generate_inputs`). ``reference`` supplies the original's outputs on
    those inputs so it is not rerun. ``rtol``/``atol`` replace the dtype
    defaults of the elementwise check and ``noise`` the float-noise bound (see
    the module docstring). With ``bisect``, a failing comparison is followed by
    a search for the first diverging node.

    Problems with the original or the inputs raise :class:`VerificationError`;
    a candidate that onnxruntime cannot load or run gives a failed report with
    ``error`` set.
    """
    orig, cand = load_model(original), load_model(candidate)
    if inputs is not None and (shapes or dims or value_ranges):
        raise VerificationError("give either inputs or shapes/dims/value_ranges to generate them, not both")
    if isinstance(inputs, str | os.PathLike):
        inputs = load_inputs(inputs)
    if inputs is not None:
        feeds = check_inputs(orig, inputs)
    else:
        feeds = generate_inputs(orig, shapes, seed, dims=dims, value_ranges=value_ranges)
    report = VerifyReport(
        ok=False,
        outputs=[],
        seed=None if inputs is not None else seed,
        input_shapes={k: list(np.shape(v)) for k, v in feeds.items()},
        input_dtypes={k: np.asarray(v).dtype.name for k, v in feeds.items()},
    )
    ref = dict(reference) if reference is not None else run_model(orig, feeds, label="original model")
    if unseeded := sorted({n.op_type for n in unseeded_random_nodes(orig.proto)}):
        report.notes.append(f"the original draws random numbers ({', '.join(unseeded)}): each such op was run "
                            "with a seed derived from its name, as in a candidate that keeps it")
    try:
        cand_feeds = _candidate_inputs(cand, feeds, report.notes)
        got = run_model(cand, cand_feeds, label="candidate model")
    except VerificationError as exc:
        report.error = str(exc)
        return report
    if extra := sorted(set(got) - set(ref)):
        report.notes.append(f"candidate outputs not in the original are not compared: {extra}")
    report.outputs = compare_outputs(ref, got, rtol, atol, noise=noise, computed_in=computed_in(orig.proto))
    report.ok = all(diff.ok for diff in report.outputs)
    if not report.ok and bisect:
        _bisect(report, orig, cand, feeds, cand_feeds, rtol=rtol, atol=atol, noise=noise)
    logger.info("verification %s", "ok" if report.ok else "FAILED")
    return report


def _candidate_inputs(
    cand: LoadedModel, feeds: Mapping[str, np.ndarray], notes: list[str]
) -> dict[str, np.ndarray]:
    """The original's inputs that the candidate takes; the candidate may drop inputs but not add any."""
    wanted = {vi.name for vi in cand.proto.graph.input}
    required = {spec.name for spec in input_specs(cand.proto)}
    if new := sorted(required - set(feeds)):
        raise VerificationError(f"the candidate requires inputs the original does not have: {new}")
    if dropped := sorted(set(feeds) - wanted):
        notes.append(f"the candidate no longer takes inputs {dropped}")
    chosen = {name: value for name, value in feeds.items() if name in wanted}
    try:
        return check_inputs(cand, chosen)
    except VerificationError as exc:
        raise VerificationError(f"the candidate's inputs differ from the original's: {exc}") from exc


def _bisect(
    report: VerifyReport,
    orig: LoadedModel,
    cand: LoadedModel,
    feeds: Mapping[str, np.ndarray],
    cand_feeds: Mapping[str, np.ndarray],
    **tolerance: float | None,
) -> None:
    try:
        report.divergence, compared = find_divergence(orig, cand, feeds, cand_feeds, **tolerance)
    except VerificationError as exc:
        report.notes.append(f"bisection failed: {exc}")
        return
    if report.divergence is None and compared == 0:
        report.notes.append("the two graphs share no intermediate value names: nothing to bisect")
    elif report.divergence is None:
        report.notes.append(
            f"all {compared} values the graphs share agree; "
            "the difference arises in values only one graph has"
        )
