"""SmoothQuant: move activation outliers into the weights of int8 MatMuls.

An int8 MatMul quantizes its input per tensor (at run time in dynamic mode, from calibrated ranges in
static mode), so the few channels of a LayerNorm output that run 10-50x larger than the rest set the scale
for all of them. Dividing input channel j by s_j and multiplying row j of the weight by s_j leaves the
product exact in float and splits the range between the two operands (Xiao et al., "SmoothQuant", 2023):
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

alpha is chosen per activation by simulating the int8 product on calibration rows (uint8 activations
ranged per sample as onnxruntime does at run time, or over all samples in static mode; the quantizer's own
int8 weights). An activation is smoothed only where that error drops by ``MIN_GAIN``: the 1/s multiply is
an extra elementwise op, unless it folds into the LayerNormalization producing the activation (pre-LN
transformers). Measured on all-MiniLM-L6-v2 (docs/quantize.md): embedding cosine 0.9937 -> 0.9963
(dynamic), for ~1.5 % of its int8 speed; static 0.9947 -> 0.9967.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir import Model, Node, Value
from graphopt.ir.tensor import ArrayTensor
from graphopt.onnx_io import to_proto
from graphopt.passes.prune.calib import run_exposed

from .config import QuantConfig
from .optable import saturating_u8s8
from .plan import Candidate, is_const
from .qparams import qrange, quantize_weight
from .ranges import Histogram, clip_range

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_GAIN = 0.2  # smooth only where the simulated error drops by this fraction
MIN_WIDTH = 2  # an unfolded 1/s multiply must feed this many outputs per input channel (see _pays)
SIM_ROWS = 1024  # activation rows the simulation multiplies (spread over the samples)
SIM_COLS = 256  # weight columns it multiplies them by (spread over the activation's MatMuls)
# Dynamic mode reads its statistics from the first samples that hold this many rows: every sample took
# BERT-base (100 samples of 128 tokens) 20 s. Static mode reads all of them: they set x / s's range.
STAT_ROWS = 4096
# Each channel's max must come from enough rows: in static mode every smoothed channel nears the range's
# edge, so one whose calibration max is low clips on new data. With 4 and 16 one-row samples (a model input
# read by a MatMul) static smoothing lowered the calibration error while held-out cosine fell 0.9997 ->
# 0.978 and 0.9999 -> 0.9992; dynamic mode kept a Mul for a held-out change of -1e-5.
MIN_ROWS = 256


@dataclass(frozen=True)
class Smoothing:
    """One activation read by int8 MatMuls: the channel scale s its readers' weights take, and why."""

    activation: str
    nodes: tuple[str, ...]  # the MatMul/Gemm nodes reading it, whose weights are multiplied by s
    scale: np.ndarray  # s, float32, one per input channel
    alpha: float
    error: tuple[float, float]  # simulated relative squared error of the int8 product: (plain, smoothed)
    bounds: tuple[float, float]  # static mode: the calibrated range of x / s (with config.method)


def plan_smoothing(model: Model, candidates: Mapping[str, Candidate], samples: Sequence[Mapping[str, np.ndarray]],
                   config: QuantConfig) -> tuple[list[Smoothing], list[str]]:
    """The activations worth smoothing, from one fp32 pass over the calibration ``samples``, and notes on
    those left alone for lack of data."""
    groups = {name: cands for name, cands in _groups(candidates).items() if _pays(cands)}
    if not groups:
        return [], []
    static = config.mode == "static"
    stats = _Stats.collect(model, groups, samples, static)
    reduce_range = saturating_u8s8() if config.reduce_range is None else config.reduce_range
    chosen, notes = [], []
    for name, cands in groups.items():
        if stats[name].rows_seen < MIN_ROWS:
            notes.append(f"{name} not smoothed: {stats[name].rows_seen} calibration rows, smoothing needs "
                         f"{MIN_ROWS} (a channel's max from fewer is a rough guess)")
            continue
        weights = [_rows_first(c) for c in cands]
        best = _best_alpha(stats[name], weights, config.per_channel, reduce_range)
        if best is not None:
            alpha, scale, error = best
            chosen.append(Smoothing(name, tuple(c.node.name for c in cands), scale, alpha, error,
                                    stats[name].bounds(scale, config)))
    return chosen, notes


def apply_smoothing(model: Model, smoothings: Iterable[Smoothing], selected: set[str]
                    ) -> tuple[list[str], dict[str, Smoothing]]:
    """Scale the weights of the ``selected`` readers of each smoothed activation and divide what they read by s
    (folded into a LayerNormalization read by nothing else, else a Mul). Returns one note per activation, and
    {the value the readers now read, x / s: its Smoothing} (static mode quantizes it with ``bounds``)."""
    graph = model.graph
    nodes = {n.name: n for n in graph.nodes}
    values = {v.name: v for v in graph.values()}
    notes, divided = [], {}
    for sm in smoothings:
        readers = [nodes[n] for n in sm.nodes if n in selected and n in nodes]
        x = values.get(sm.activation)
        if not readers or x is None:
            continue
        inv = (1.0 / sm.scale).astype(np.float32)
        if _fold_into_layernorm(graph, x, readers, inv):
            how = "folded into its LayerNormalization"
            divided[x.name] = sm
        else:
            inv_const = graph.add_initializer(ArrayTensor(inv, graph.fresh_name(f"{x.name}_smooth_inv")))
            mul = Node("Mul", [x, inv_const], outputs=[graph.fresh_name(f"{x.name}_smoothed")],
                       name=graph.fresh_name(f"{x.name}_smooth"))
            graph.append(mul)
            for node in readers:
                node.set_input(0, mul.outputs[0])
            how = "a Mul"
            divided[mul.outputs[0].name] = sm
        scaled: dict[str, Value] = {}
        for node in readers:
            w = node.inputs[1]
            if w.name not in scaled:
                array = w.const.numpy()
                factor = sm.scale.reshape((1, -1) if _transposed(node) else (-1, 1))
                scaled[w.name] = graph.add_initializer(
                    ArrayTensor((array * factor).astype(np.float32), graph.fresh_name(f"{w.name}_smoothed")))
            node.set_input(1, scaled[w.name])
        before, after = sm.error
        notes.append(f"smoothed {sm.activation} (alpha {sm.alpha:g}, {how}) for {len(readers)} int8 MatMul(s): "
                     f"simulated error {before:.2e} -> {after:.2e}")
    return notes, divided


# ------------------------------------------------------------------------------------------- planning


def _groups(candidates: Mapping[str, Candidate]) -> dict[str, list[Candidate]]:
    """{activation name: the MatMul/Gemm candidates reading it as input 0 with a 2-D float32 constant weight}."""
    groups: dict[str, list[Candidate]] = {}
    for cand in candidates.values():
        node = cand.node
        if node.op_type not in ("MatMul", "Gemm") or cand.weight != 1 or node.attr("transA", 0):
            continue
        x, w = node.inputs[0], node.inputs[1]
        if is_const(x) or len(w.shape or ()) != 2 or w.elem_type != onnx.TensorProto.FLOAT:
            continue
        groups.setdefault(x.name, []).append(cand)
    return groups


def _pays(cands: Sequence[Candidate]) -> bool:
    """Whether the 1/s multiply is cheap beside what it serves: free where it folds into a LayerNormalization,
    else its K values per row must feed at least ``MIN_WIDTH`` x K products (a BERT layer's q/k/v and first
    FFN projections, not its attention output and second FFN projections: smoothing all four kinds cost MiniLM
    3.4 % of its speed, the first two 1.5 %)."""
    x = cands[0].node.inputs[0]
    shapes = [tuple(reversed(c.node.inputs[1].shape)) if _transposed(c.node) else c.node.inputs[1].shape
              for c in cands]
    k, n = shapes[0][0], sum(shape[1] for shape in shapes)
    if _layernorm_to_fold(x, [c.node for c in cands], k) is not None:
        return True
    return n >= MIN_WIDTH * k


def _transposed(node: Node) -> bool:
    """Whether the weight is stored (output channels, input channels)."""
    return node.op_type == "Gemm" and bool(node.attr("transB", 0))


def _rows_first(cand: Candidate) -> np.ndarray:
    """The weight as (input channels, output channels)."""
    w = cand.node.inputs[1].const.numpy().astype(np.float32)
    return w.T if _transposed(cand.node) else w


@dataclass
class _Stats:
    """Per activation: per-channel max |x|, per-sample per-channel min and max (for the ranges of x / s, exact
    for any s > 0; in static mode the whole data set is one "sample", its range calibrated once), and up to
    ``SIM_ROWS`` rows with the sample each came from; from the samples holding ``STAT_ROWS`` rows in dynamic
    mode, all of them in static mode."""

    absmax: np.ndarray
    mins: np.ndarray  # (samples, channels)
    maxs: np.ndarray
    rows: np.ndarray  # (rows, channels)
    sample_of_row: np.ndarray
    rows_seen: int  # rows in all the data (``rows`` keeps at most SIM_ROWS)

    @classmethod
    def collect(cls, model: Model, groups: Mapping[str, list[Candidate]],
                samples: Sequence[Mapping[str, np.ndarray]], static: bool) -> dict[str, _Stats]:
        used = len(samples)
        parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {name: [] for name in groups}
        seen = dict.fromkeys(groups, 0)
        for i, values in enumerate(run_exposed(to_proto(model), list(groups), samples,
                                               label="model (smoothing statistics)")):
            if i == 0 and not static:  # rows per sample from the first: enough samples for STAT_ROWS rows
                rows = int(np.prod(np.shape(values[next(iter(groups))])[:-1]))
                used = min(used, max(1, -(-STAT_ROWS // max(rows, 1))))
            per_sample = max(1, SIM_ROWS // used)
            for name in groups:
                x = np.asarray(values[name], np.float32)
                x = x.reshape(-1, x.shape[-1])
                keep = x[np.linspace(0, len(x) - 1, min(per_sample, len(x))).astype(int)]
                seen[name] += len(x)
                parts[name].append((x.min(0), x.max(0), keep))
            if i + 1 >= used:
                break
        stats = {}
        for name, got in parts.items():
            mins, maxs = np.stack([g[0] for g in got]), np.stack([g[1] for g in got])
            rows = np.concatenate([g[2] for g in got])
            sample_of_row = np.concatenate([np.full(len(g[2]), 0 if static else i) for i, g in enumerate(got)])
            if static:
                mins, maxs = mins.min(0, keepdims=True), maxs.max(0, keepdims=True)
            stats[name] = cls(np.maximum(-mins.min(0), maxs.max(0)), mins, maxs, rows, sample_of_row, seen[name])
        return stats

    def bounds(self, scale: np.ndarray, config: QuantConfig) -> tuple[float, float]:
        """The range static mode quantizes x / s with: exact for minmax, else ``config.method`` on a histogram
        of the sampled rows (dynamic mode ranges at run time and does not use it)."""
        lo, hi = float((self.mins / scale).min()), float((self.maxs / scale).max())
        if config.mode != "static" or config.method == "minmax":
            return min(lo, 0.0), max(hi, 0.0)
        hist = Histogram()
        hist.observe(lo, hi, (self.rows / scale).ravel())
        hist.finish()
        qmin, qmax = qrange(np.dtype(config.activation_type))
        return clip_range(hist, config.method, qmax - qmin + 1, config.percentile)


def _best_alpha(stats: _Stats, weights: Sequence[np.ndarray], per_channel: bool, reduce_range: bool
                ) -> tuple[float, np.ndarray, tuple[float, float]] | None:
    """(alpha, s, (error without, error with)) of the alpha with the smallest simulated error, or None where
    smoothing does not gain ``MIN_GAIN``."""
    wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    columns = _column_sample(weights)
    reference = [stats.rows @ w[:, cols] for w, cols in zip(weights, columns, strict=True)]
    plain = _error(stats, np.ones_like(wmax), weights, columns, reference, per_channel, reduce_range)
    best = None
    for alpha in ALPHAS:
        scale = (np.maximum(stats.absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        error = _error(stats, scale, weights, columns, reference, per_channel, reduce_range)
        if best is None or error < best[2][1]:
            best = (alpha, scale, (plain, error))
    if best is None or not best[2][1] < (1 - MIN_GAIN) * plain:
        return None
    return best


def _column_sample(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Evenly spread output columns, about ``SIM_COLS`` in all, in proportion to each weight's width."""
    total = sum(w.shape[1] for w in weights)
    return [np.unique(np.linspace(0, w.shape[1] - 1, max(1, SIM_COLS * w.shape[1] // total)).astype(int))
            for w in weights]


def _error(stats: _Stats, scale: np.ndarray, weights: Sequence[np.ndarray], columns: Sequence[np.ndarray],
           reference: Sequence[np.ndarray], per_channel: bool, reduce_range: bool) -> float:
    """Relative squared error of uint8(x / s) @ int8(s * W) against x @ W on the sampled rows and columns."""
    # Per sample, the range onnxruntime's DynamicQuantizeLinear takes: min/max of x / s, widened to hold 0.
    lo = np.minimum((stats.mins / scale).min(axis=1), 0.0)[stats.sample_of_row]
    hi = np.maximum((stats.maxs / scale).max(axis=1), 0.0)[stats.sample_of_row]
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)[:, None]
    zero = np.clip(np.round(-lo[:, None] / step), 0, 255)
    x = (np.clip(np.round(stats.rows / scale / step) + zero, 0, 255) - zero) * step
    noise = signal = 0.0
    for w, cols, ref in zip(weights, columns, reference, strict=True):
        q, qp = quantize_weight(w * scale[:, None], 1 if per_channel else None, reduce_range)
        w_scale = qp.scale[cols] if per_channel else qp.scale
        got = x.astype(np.float32) @ (q[:, cols].astype(np.float32) * w_scale)
        noise += float(((got - ref) ** 2).sum())
        signal += float((ref ** 2).sum())
    return noise / signal if signal > 0 else 0.0


# ------------------------------------------------------------------------------------------- applying


def _layernorm_to_fold(x: Value, readers: Sequence[Node], width: int) -> Node | None:
    """The LayerNormalization producing ``x`` if ``readers`` are all that read it and its scale and bias are
    constant vectors over the last axis: dividing those by s replaces the 1/s multiply."""
    ln = x.producer
    if (ln is None or ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx") or x.index != 0
            or x.is_graph_output() or {id(n) for n in x.users()} != {id(n) for n in readers}
            or ln.attr("axis", -1) not in (-1, len(x.shape or ()) - 1)):
        return None
    params = [v for v in ln.inputs[1:3] if v is not None]
    if not all(is_const(v) and tuple(v.shape or ()) == (width,) for v in params):
        return None
    return ln


def _fold_into_layernorm(graph, x: Value, readers: Sequence[Node], inv: np.ndarray) -> bool:
    ln = _layernorm_to_fold(x, readers, len(inv))
    if ln is None:
        return False
    for i, v in enumerate(ln.inputs[1:3], start=1):
        if v is not None:
            scaled = (v.const.numpy() * inv).astype(v.const.numpy().dtype)
            ln.set_input(i, graph.add_initializer(ArrayTensor(scaled, graph.fresh_name(f"{v.name}_smoothed"))))
    return True
