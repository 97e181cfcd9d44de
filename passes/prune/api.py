"""``prune(model, config)``: analysis, ranking, slicing, reconstruction and checks in one call.

The steps, each in its own module: lift constants so every weight is an
initializer; probe shapes with two onnxruntime runs (``probe``); find channel
groups (``groups``); decide how many atoms each group keeps (``plan``) and
which (``importance``); slice (``apply``); refit the layers that lost inputs
(``reconstruct``, on when calibration data is given); drop what became dead;
check that the result runs in onnxruntime with the original's input and
output names and shapes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.pipeline import PassContext, get_pass
from graphopt.verify.runtime import LoadedModel, open_session, run_session

from .allocate import allocate_latency, onnxruntime_measure
from .apply import apply_removal, kept_indices
from .branches import consumer_means, drop_branches
from .calib import CalibSource, activation_stats, batches, load_calibration, run_exposed
from .cost import group_cost, model_cost
from .groups import Analysis, analyze, default_protected
from .importance import CRITERIA, importance
from .plan import FILTER_SET, choose, cpu_block, drop_branches_to_fit, fill_budget, plan_flops, plan_ratio
from .probe import ShapeTable, probe_shapes
from .reconstruct import own_input, reconstruct
from .renorm import BN_STATS
from .report import GroupReport, PruneReport
from .rules import X_IN, Y_OUT

log = logging.getLogger(__name__)
ALLOCATIONS = ("uniform", "latency")


@dataclass
class PruneConfig:
    """What to prune and how. Exactly one of ``ratio`` (per-group fraction of channels removed) and
    ``flops`` (fraction of the MACs to keep, e.g. 0.5) must be set."""

    ratio: float | None = None
    flops: float | None = None
    criterion: str = "l1"  # l1 | l2 | bn | activation | recon
    round_to: int = 1  # kept channel counts rounded down to a multiple of this (never below one multiple)
    latency: bool = False  # counts for onnxruntime's CPU conv kernels: NCHWc blocks, whole filter sets (plan.py)
    allocate: str = "uniform"  # uniform ratio | latency: per-group counts by measured onnxruntime time (allocate.py)
    protect: Sequence[str] = ()  # node names whose output channels stay, besides the defaults
    default_protect: bool = True  # the first conv and the layers producing model outputs
    calib: CalibSource | None = None  # .npz, folder of .npz, or iterable of feed dicts
    calib_samples: int = 256
    calib_batch: int = 16
    reconstruct: bool | None = None  # least-squares refit; None: on when calibration data is given
    bn_stats: str = "variance"  # re-estimate BN statistics on calibration data: variance | mean | off
    sequential: bool = True  # refit from the already-refit pruned model (else from the original's activations)
    max_rows: int = 4096  # least-squares rows sampled per layer
    max_ratio: float = 0.9  # the highest per-group ratio a FLOPs target may use
    dims: Mapping[str, int] | None = None  # symbolic dim sizes for shape probing and MAC counts
    # input shapes (or a symbolic dim as {"seq": [400]}) for the same; default: the first calibration sample's
    shapes: Mapping[str, Sequence[int]] | None = None
    verify: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if (self.ratio is None) == (self.flops is None):
            raise GraphoptError("give exactly one of ratio (per-layer) and flops (global MAC target)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise GraphoptError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise GraphoptError(f"flops must be in (0, 1] (the fraction of MACs to keep), got {self.flops}")
        if self.criterion not in CRITERIA:
            raise GraphoptError(f"unknown criterion {self.criterion!r}", hint=f"use one of {', '.join(CRITERIA)}")
        if self.round_to < 1:
            raise GraphoptError(f"round must be at least 1, got {self.round_to}")
        if self.allocate not in ALLOCATIONS:
            raise GraphoptError(f"unknown allocation {self.allocate!r}", hint=f"use one of {', '.join(ALLOCATIONS)}")
        if self.allocate == "latency" and self.flops is None:
            raise GraphoptError("latency allocation needs a FLOPs target", hint="give flops (--flops F), not ratio")
        if self.bn_stats not in BN_STATS:
            raise GraphoptError(f"unknown bn_stats {self.bn_stats!r}", hint=f"use one of {', '.join(BN_STATS)}")
        if self.reconstruct and self.calib is None:
            raise GraphoptError("reconstruction needs calibration data", hint="pass calib (--calib DATA)")


def prune(model: Model, config: PruneConfig) -> PruneReport:
    """Prune ``model`` (from ``graphopt.load``) in place and report what changed."""
    config.check()
    # Lossless simplification first: TorchScript reaches shared weights through Identity nodes and reads
    # channel counts with Shape (GPT-2's x.view(-1, x.size(-1))), which folded become constants to rewrite.
    graphopt.optimize(model, level="simplify")
    _untie_shared_vectors(model)
    original = graphopt.to_proto(model)
    samples = load_calibration(config.calib, original, config.calib_samples) if config.calib is not None else []
    sizes = config.shapes
    if sizes is None and config.dims is None and samples:  # shapes the model is known to run at
        sizes = {name: np.shape(value) for name, value in samples[0].items()}
    shapes = probe_shapes(model, original, config.dims, sizes)
    feeds = batches(samples, original, config.calib_batch)
    protect = list(config.protect) + (default_protected(model) if config.default_protect else [])
    analysis = analyze(model, shapes, protect)
    prunable = [g for g in analysis.groups if g.prunable]
    round_to, set_size = config.round_to, 1
    latency = config.latency or config.allocate == "latency"
    if latency:
        round_to, set_size = round_to if round_to > 1 else cpu_block(), FILTER_SET
    if config.allocate == "latency":
        measure = onnxruntime_measure(original, shapes, protect, shapes.feeds)
        plan = allocate_latency(analysis, prunable, config.flops, round_to, set_size, measure)
        target = f"keep {100 * config.flops:g}% of MACs, counts by measured onnxruntime time"
    elif config.ratio is not None:
        plan = plan_ratio(analysis, prunable, config.ratio, round_to, set_size)
        target = f"ratio {config.ratio:g} per group"
    else:
        plan = plan_flops(analysis, prunable, config.flops, round_to, config.max_ratio, set_size)
        if config.latency:
            plan = fill_budget(analysis, prunable, plan, config.flops, round_to, set_size)
            plan = drop_branches_to_fit(analysis, prunable, plan, config.flops, round_to, set_size)
        target = f"keep {100 * config.flops:g}% of MACs"
    if latency:
        target += f", counts in blocks of {round_to} (sets of {set_size} above {set_size})"
    stats = None
    if config.criterion in ("activation", "recon"):
        if not feeds:
            raise GraphoptError(f"the {config.criterion} criterion needs calibration data", hint="pass --calib DATA")
        stats = _stats(analysis, prunable, original, feeds, covariance=config.criterion == "recon")
    removal = {g.id: choose(importance(analysis, g, config.criterion, stats), plan.keep[g.id]) for g in prunable}
    kept = kept_indices(analysis, removal)
    removed = {key: float(analysis.dims[key].size - len(idx)) for key, idx in kept.items()}
    rows = _rows(analysis, removal, removed)
    macs0, params0 = model_cost(analysis, {})
    macs1, params1 = model_cost(analysis, removed)
    whole = [g for g in prunable if plan.keep[g.id] == 0]
    means = consumer_means(analysis, whole, original, feeds) if whole and feeds else None
    apply_removal(analysis, kept)
    constants = drop_branches(model, analysis, whole, kept, means)
    do_refit = config.reconstruct if config.reconstruct is not None else bool(feeds)
    renorm = None if config.bn_stats == "off" or not feeds else config.bn_stats
    refits, renorms = [], []
    if (do_refit or renorm) and kept:
        refits, renorms = reconstruct(model, original, shapes, kept, feeds, refit=do_refit, renorm=renorm,
                                      max_rows=config.max_rows, sequential=config.sequential, seed=config.seed)
    for name in ("eliminate-dead-nodes", "remove-unused-initializers"):
        get_pass(name).run(model, PassContext())
    report = PruneReport(macs0, macs1, params0, params1, plan.ratio, target, config.criterion, rows, refits,
                         bool(refits), len(samples), renorms=renorms,
                         uniform=config.allocate == "uniform")
    if constants:
        source = "their mean output on the calibration data" if means else "their biases"
        report.notes.append(f"whole residual branches removed (groups {', '.join(str(g.id) for g in whole)}): "
                            f"{', '.join(constants)} became constants ({source})")
    if config.flops is not None and macs1 > config.flops * macs0 * 1.001:
        report.notes.append(f"FLOPs target not reached: blocked groups keep {100 * macs1 / macs0:.1f}% of the MACs")
    if config.verify:
        check_interface(original, model, shapes)
    if feeds:
        report.output_sqnr_db = output_sqnr(original, graphopt.to_proto(model), feeds)
    log.info("pruned: MACs %.0f -> %.0f, params %.0f -> %.0f", macs0, macs1, params0, params1)
    return report


def _untie_shared_vectors(model: Model) -> None:
    """Exporters share equal float vectors between layers (TorchScript: all zero conv biases are one
    initializer); shared, their channels would tie those layers into one group, which the protected first
    conv then blocks whole. Inference ties nothing: each reader gets its own copy. Matrices stay shared
    (tied weights, ALBERT's layers: copies would cost their size)."""
    for node in list(model.graph):
        for index, value in enumerate(node.inputs):
            const = value.const if value is not None else None
            if const is not None and len(const.shape) == 1 and const.shape[0] > 1 and const.dtype.kind == "f" \
                    and len(value.uses()) > 1:
                own_input(model.graph, node, index)


def _stats(analysis: Analysis, groups, proto: onnx.ModelProto, feeds, covariance: bool = False) -> dict:
    """Activation statistics of the dims the data-driven criteria read (covariances for ``recon``)."""
    wanted: dict[str, set[int]] = {}
    cov = []
    for group in groups:
        for key in group.dims:
            info = analysis.dims[key]
            if not info.is_const and any(role in (X_IN, Y_OUT) for _, role in info.roles):
                wanted.setdefault(key[0], set()).add(key[1])
                if covariance and info.size <= 4096 and any(role == X_IN for _, role in info.roles):
                    cov.append(key)
    return activation_stats(proto, wanted, feeds, cov)


def _rows(analysis: Analysis, removal: Mapping[int, np.ndarray], removed: Mapping) -> list[GroupReport]:
    rows = []
    for group in analysis.groups:
        if not group.producers:
            continue  # axes no layer produces (e.g. head_dim inside attention): nothing to report
        macs0, params0 = group_cost(analysis, group.dims, {})
        macs1, params1 = group_cost(analysis, group.dims, removed)
        dropped = len(removal.get(group.id, ()))
        status = "blocked" if group.blocked else ("removed" if dropped == group.n else "pruned" if dropped else "kept")
        rows.append(GroupReport(group.id, group.name, status, group.n, group.n - dropped,
                                group.width(group.primary_dim(analysis)), macs0, macs1, params0, params1,
                                group.producers + [c for c in group.consumers if c not in group.producers],
                                [{"node": n, "reason": r} for n, r in group.blocked]))
    return rows


def check_interface(original: onnx.ModelProto, model: Model, shapes: ShapeTable) -> None:
    """The pruned model runs in onnxruntime on the shape probe's inputs and keeps the original's input/output
    names and shapes."""
    pruned = graphopt.to_proto(model)
    names = ([i.name for i in original.graph.input], [o.name for o in original.graph.output])
    got = ([i.name for i in pruned.graph.input], [o.name for o in pruned.graph.output])
    if names != got:
        raise GraphoptError(f"pruning changed the model's interface: {names} -> {got}")
    try:
        with open_session(LoadedModel(pruned), label="pruned model") as sess:
            values = run_session(sess, shapes.feeds)
    except Exception as exc:  # noqa: BLE001 - any failure here is a pruning bug worth one clear message
        raise GraphoptError(f"the pruned model does not run in onnxruntime: {exc}") from exc
    for out in original.graph.output:
        want = shapes.concrete(model.graph.outputs[[o.name for o in original.graph.output].index(out.name)])
        if want is not None and tuple(np.shape(values[out.name])) != tuple(want):
            raise GraphoptError(f"pruning changed the shape of output {out.name!r}: {want} -> "
                                f"{np.shape(values[out.name])}")


def output_sqnr(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds) -> dict[str, float]:
    """Signal-to-noise ratio (dB) of each float output of the pruned model against the original's."""
    names = [o.name for o in original.graph.output]
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for ref, got in zip(run_exposed(original, names, feeds), run_exposed(pruned, names, feeds), strict=True):
        for name in names:
            r, g = np.asarray(ref[name]), np.asarray(got[name])
            if r.dtype.kind != "f":
                continue
            signal[name] = signal.get(name, 0.0) + float(np.sum(r.astype(np.float64) ** 2))
            noise[name] = noise.get(name, 0.0) + float(np.sum((r.astype(np.float64) - g) ** 2))
    return {n: 10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf for n in signal}
