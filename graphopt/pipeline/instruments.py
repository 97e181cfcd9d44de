"""Instruments hook before and after every pass: timing, IR checks, numerics, dumps."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import GraphoptError
from ..ir import verify as verify_ir

if TYPE_CHECKING:
    from ..ir import Model
    from .base import Pass, PassResult
    from .context import PassContext

log = logging.getLogger(__name__)


class Instrument:
    """Override either hook; both do nothing by default."""

    def before_pass(self, pass_: Pass, model: Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, pass_: Pass, model: Model, ctx: PassContext, result: PassResult) -> None:
        pass


@dataclass
class PassStats:
    runs: int = 0
    changes: int = 0
    seconds: float = 0.0
    details: dict = field(default_factory=dict)  # the passes' own counts (e.g. per rule), summed over runs


def _merge_counts(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict):
            _merge_counts(into.setdefault(key, {}), value)
        elif isinstance(value, int | float) and isinstance(into.get(key, 0), int | float):
            into[key] = into.get(key, 0) + value
        else:
            into[key] = value


@dataclass
class TimingInstrument(Instrument):
    """Wall time and change counts per pass, summed over fixed-point iterations."""

    stats: dict[str, PassStats] = field(default_factory=dict)
    _start: float = 0.0

    def before_pass(self, pass_, model, ctx) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_, model, ctx, result) -> None:
        stats = self.stats.setdefault(pass_.name, PassStats())
        stats.runs += 1
        stats.changes += result.changes
        stats.seconds += time.perf_counter() - self._start
        _merge_counts(stats.details, result.details)


class PassBrokeGraph(GraphoptError):
    """A pass left the IR ill-formed or changed the model's outputs; names the pass."""

    def __init__(self, pass_name: str, problem: str, report: object | None = None) -> None:
        self.pass_name = pass_name
        self.report = report
        super().__init__(f"pass {pass_name!r} {problem}")


class VerifyIRInstrument(Instrument):
    """Run the IR well-formedness check after every pass that changed something."""

    def after_pass(self, pass_, model, ctx, result) -> None:
        if not result.modified:
            return
        try:
            verify_ir(model)
        except GraphoptError as err:
            raise PassBrokeGraph(pass_.name, f"left the graph ill-formed: {err}") from None


class NumericsInstrument(Instrument):
    """Compare the model's outputs with the original's after every pass that changed something.

    The reference outputs are computed once from the original; the first pass
    whose result diverges is named, with the verification report.
    """

    def __init__(self, original, inputs: dict, *, rtol: float | None = None, atol: float | None = None) -> None:
        from .. import verify

        self._verify = verify
        self.inputs = inputs
        self.rtol, self.atol = rtol, atol
        self.reference = verify.reference_outputs(original, inputs)
        self._original = original

    def after_pass(self, pass_, model, ctx, result) -> None:
        if not result.modified:
            return
        from ..onnx_io import runnable

        with runnable(model) as candidate:
            report = self._verify.verify_models(self._original, candidate, inputs=self.inputs, rtol=self.rtol,
                                                atol=self.atol, reference=self.reference)
        if not report.ok:
            raise PassBrokeGraph(pass_.name, "changed the model's outputs", report)


class DumpIRInstrument(Instrument):
    """Save the model after every pass that changed it (``NN-<pass>.onnx``) for debugging."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.count = 0
        os.makedirs(folder, exist_ok=True)

    def after_pass(self, pass_, model, ctx, result) -> None:
        if result.modified:
            from ..onnx_io import save

            self.count += 1
            save(model, os.path.join(self.folder, f"{self.count:03d}-{pass_.name}.onnx"))
