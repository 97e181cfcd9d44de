"""Runs a list of passes to a fixed point, with instruments around every pass."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import GraphoptError
from ..ir import Model
from .base import Pass, PassResult
from .context import PassContext
from .instruments import Instrument, PassStats, TimingInstrument
from .registry import available_passes, default_pipeline, get_pass

log = logging.getLogger(__name__)

# Instruments applied to every PassManager run inside ``instrument_all`` (tests use it
# to check the IR after every pass of every pipeline).
_GLOBAL_INSTRUMENTS: list[Instrument] = []


@contextlib.contextmanager
def instrument_all(*instruments: Instrument) -> Iterator[None]:
    """Add ``instruments`` to every pipeline run in this block."""
    _GLOBAL_INSTRUMENTS.extend(instruments)
    try:
        yield
    finally:
        for instrument in instruments:
            _GLOBAL_INSTRUMENTS.remove(instrument)


@dataclass
class PipelineReport:
    """What a pipeline run did: per-pass stats, iterations, whether it converged."""

    stats: dict[str, PassStats] = field(default_factory=dict)
    iterations: int = 0
    converged: bool = True

    @property
    def total_changes(self) -> int:
        return sum(s.changes for s in self.stats.values())

    def to_dict(self) -> dict:
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "passes": {name: vars(s) for name, s in self.stats.items()},
        }


class PassManager:
    """Run ``passes`` (names or instances) repeatedly until none changes the model.

    The iteration cap guards against two passes that undo each other; hitting it
    is reported (``converged=False``), not an error.
    """

    def __init__(self, passes: Sequence[Pass | str] | None = None, ctx: PassContext | None = None) -> None:
        names = default_pipeline() if passes is None else passes
        self.ctx = ctx or PassContext()
        self.passes = [p if isinstance(p, Pass) else get_pass(p) for p in names]
        if self.ctx.disabled:  # a misspelt name would otherwise disable nothing, silently
            known = set(available_passes()) | {p.name for p in self.passes}
            if unknown := sorted(self.ctx.disabled - known):
                raise GraphoptError(f"cannot disable unknown pass {unknown[0]!r}",
                                    hint=f"available passes: {', '.join(sorted(known))}")
        self.passes = [p for p in self.passes if p.name not in self.ctx.disabled]

    def run(self, model: Model) -> PipelineReport:
        timing = TimingInstrument()
        instruments = [timing, *self.ctx.instruments, *_GLOBAL_INSTRUMENTS]
        report = PipelineReport(stats=timing.stats)
        for name in (p.name for p in self.passes):
            timing.stats.setdefault(name, PassStats())
        report.converged = False
        for iteration in range(1, self.ctx.max_iterations + 1):
            report.iterations = iteration
            changed = False
            for pass_ in self.passes:
                result = self._run_one(pass_, model, instruments)
                changed |= result.modified
            if not changed:
                report.converged = True
                break
        if not report.converged:
            log.warning("pipeline did not reach a fixed point in %d iterations", self.ctx.max_iterations)
        return report

    def _run_one(self, pass_: Pass, model: Model, instruments) -> PassResult:
        for instrument in instruments:
            instrument.before_pass(pass_, model, self.ctx)
        result = pass_.run(model, self.ctx)
        log.debug("%s: %d changes", pass_.name, result.changes)
        for instrument in instruments:
            instrument.after_pass(pass_, model, self.ctx, result)
        return result
