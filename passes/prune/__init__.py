"""Structured channel pruning of ONNX graphs, with least-squares reconstruction instead of retraining.

    import graphopt
    from graphopt.passes.prune import prune, PruneConfig

    model = graphopt.load("model.onnx")
    report = prune(model, PruneConfig(flops=0.5, calib="calib.npz"))   # keep 50 % of the MACs
    graphopt.save(model, "model.pruned.onnx")

Channels are found and coupled by a graph analysis (``groups``), ranked
(``importance``), physically removed (``apply``) and the layers that lost
inputs are refit on calibration data (``reconstruct``). The result is a
smaller, plain ONNX model. The ``prune-channels`` pass runs the same from a
pipeline, reading its options from the PassContext (``prune-channels.ratio``...).
"""

from __future__ import annotations

from graphopt.ir import Model
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

from .api import PruneConfig, prune
from .calib import CalibrationError, load_calibration
from .groups import Analysis, ChannelGroup, analyze
from .report import GroupReport, PruneReport, render

__all__ = ["Analysis", "CalibrationError", "ChannelGroup", "GroupReport", "PruneConfig", "PruneReport", "analyze",
           "load_calibration", "prune", "render"]


@register_pass
class PruneChannels(Pass):
    """Lossy: never in the default pipeline. Options are PruneConfig fields under ``prune-channels.``."""

    name = "prune-channels"
    description = "Structured channel pruning (ratio or FLOPs target), least-squares reconstruction on calib data"
    lossless = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fields = PruneConfig.__dataclass_fields__
        config = PruneConfig(**{k: ctx.option(self.name, k) for k in fields if ctx.option(self.name, k) is not None})
        report = prune(model, config)
        removed = sum(g.atoms_before - g.atoms_after for g in report.groups)
        return PassResult(removed, {"report": report.to_dict()})
