"""Activation statistics: onnxruntime runs the fp32 model once per pass over the calibration data with the
tensors to observe exposed as extra outputs; only running statistics are kept (streaming).

min/max needs one pass; histogram methods a second one, whose bins span the first pass's range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from graphopt.verify.runtime import LoadedModel, open_session, run_session

from .ranges import Histogram


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield bar


def observe(proto: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
            histograms: bool, progress: Progress | None = None) -> tuple[dict[str, Histogram], dict[str, np.dtype]]:
    """Histogram (min/max, plus bins if ``histograms``) of every float tensor in ``tensors``; and each
    tensor's dtype, so callers can drop integer tensors."""
    stats = {name: Histogram() for name in tensors}
    dtypes: dict[str, np.dtype] = {}
    passes = 2 if histograms else 1
    task = progress.add_task("calibrating", total=passes * len(feeds)) if progress is not None else None
    with open_session(LoadedModel(proto), list(tensors), label="model (calibration)") as sess:
        for pass_index in range(passes):
            if pass_index == 1:
                for h in stats.values():
                    h.start_histogram()
            for feed in feeds:
                values = run_session(sess, feed, list(tensors))
                for name, value in values.items():
                    value = np.asarray(value)
                    dtypes[name] = value.dtype
                    if value.dtype != np.float32 or value.size == 0:
                        continue
                    if pass_index == 0:
                        stats[name].observe_range(value)
                    else:
                        stats[name].observe_histogram(value)
                if task is not None:
                    progress.advance(task)
    return {k: v for k, v in stats.items() if dtypes.get(k) == np.float32 and np.isfinite(v.lo)}, dtypes
