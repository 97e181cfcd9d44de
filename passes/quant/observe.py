"""Activation statistics, computed inside onnxruntime.

Exposing every observed tensor as a model output made calibration 2-3x slower than the model itself
(ResNet-50: 0.9 s per sample against 0.39 s: every output is a fresh allocation copied to numpy). So
the fp32 model gets, per observed tensor, a ReduceMin, a ReduceMax and (for histogram methods) a
strided subsample of at most ``SUBSAMPLE`` values, and only those small tensors come back. One pass
over the calibration data; memory per tensor is bounded (``Histogram.add_values`` decimates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from graphopt.passes.prune.calib import CALIB_HINT
from graphopt.verify.runtime import LoadedModel, open_session, run_session

from .evaluate import run_outputs, session
from .ranges import Histogram

SUBSAMPLE = 1 << 14  # values per tensor and batch kept for the histogram


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield bar


def float_tensors(proto: onnx.ModelProto, tensors: Sequence[str], feed: dict[str, np.ndarray]) -> dict[str, str]:
    """{tensor: dtype name} from one run with the tensors exposed (the IR does not always know types)."""
    with open_session(LoadedModel(proto), list(tensors), label="model (calibration)") as sess:
        values = run_session(sess, feed, list(tensors), label="model (calibration)", hint=CALIB_HINT)
    return {name: str(np.asarray(v).dtype) for name, v in values.items()}


def with_statistics(proto: onnx.ModelProto, tensors: Sequence[str], subsample: bool) -> onnx.ModelProto:
    """A copy of ``proto`` with extra outputs: min, max (and a strided subsample) of each tensor."""
    stats = onnx.ModelProto()
    stats.CopyFrom(proto)
    graph = stats.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), "_gq_flat"),
                              numpy_helper.from_array(np.array(SUBSAMPLE, np.int64), "_gq_keep"),
                              numpy_helper.from_array(np.array(1, np.int64), "_gq_one"),
                              numpy_helper.from_array(np.array([0], np.int64), "_gq_zero"),
                              numpy_helper.from_array(np.array([2**62], np.int64), "_gq_end")])
    for i, name in enumerate(tensors):
        flat, lo, hi = f"_gq{i}_flat", f"_gq{i}_min", f"_gq{i}_max"
        nodes = [helper.make_node("ReduceMin", [name], [lo], keepdims=0),  # no axes: over everything
                 helper.make_node("ReduceMax", [name], [hi], keepdims=0)]
        outputs = [lo, hi]
        if subsample:
            size, step, steps, sub = f"_gq{i}_size", f"_gq{i}_step", f"_gq{i}_steps", f"_gq{i}_sub"
            nodes += [helper.make_node("Reshape", [name, "_gq_flat"], [flat]),
                      helper.make_node("Size", [name], [size]),
                      helper.make_node("Div", [size, "_gq_keep"], [f"{step}0"]),
                      helper.make_node("Max", [f"{step}0", "_gq_one"], [step]),
                      helper.make_node("Reshape", [step, "_gq_flat"], [steps]),
                      helper.make_node("Slice", [flat, "_gq_zero", "_gq_end", "_gq_zero", steps], [sub])]
            outputs.append(sub)
        graph.node.extend(nodes)
        graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return stats


def observe(proto: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
            histograms: bool, progress: Progress | None = None, keep_outputs: int = 0
            ) -> tuple[dict[str, Histogram], list[dict[str, np.ndarray]]]:
    """Min/max (and a histogram if ``histograms``) of each float32 tensor in ``tensors`` over ``feeds``, and
    the model's own outputs for the first ``keep_outputs`` feeds (the fp32 reference, at no extra run)."""
    stats = {name: Histogram() for name in tensors}
    stats_proto = with_statistics(proto, tensors, histograms)
    task = progress.add_task("calibrating", total=len(feeds)) if progress is not None else None
    # All graph optimizations on: only small statistics leave the graph, so onnxruntime still fuses and
    # uses its fast conv layouts (its verification sessions, optimizations off, ran ResNet-50 2x slower).
    sess = session(stats_proto.SerializeToString(), label="model (calibration)")
    model_outputs = [o.name for o in proto.graph.output]
    reference = []
    for number, feed in enumerate(feeds):
        values = run_outputs(sess, [feed], label=f"model on calibration sample {number}",
                             hint=CALIB_HINT)[0]
        if len(reference) < keep_outputs:
            reference.append({k: values[k] for k in model_outputs})
        for i, name in enumerate(tensors):
            lo, hi = values[f"_gq{i}_min"], values[f"_gq{i}_max"]
            if lo.size and np.isfinite(lo) and np.isfinite(hi):
                stats[name].observe(float(lo), float(hi), values.get(f"_gq{i}_sub"))
        if task is not None:
            progress.advance(task)
    for h in stats.values():
        h.finish()
    return {k: v for k, v in stats.items() if np.isfinite(v.lo)}, reference
