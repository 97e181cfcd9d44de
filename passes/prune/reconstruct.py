"""Reconstruction instead of retraining: refit each layer that lost input channels by least squares.

After pruning, a layer whose *input* channels were removed no longer computes
what it used to. Its output is a linear function of its input, so the best
weights for the channels that remain are a least-squares problem: match the
unpruned model's output ``Y`` (on calibration data) from the pruned model's
input ``X`` (ThiNet / channel-pruning style). Conv inputs become im2col patch
rows at sampled output positions, so memory is bounded by ``max_rows``.

Layers are refit in waves in topological order, and each wave reads ``X``
from the pruned model *as already refit upstream*, so every layer also
absorbs the error left by the ones before it. A following BatchNorm keeps its
statistics: the refit conv reproduces the original conv's output, which is
what the statistics describe. The ridge term pulls toward the sliced original
weights, which matters when calibration rows are few (a Gemm after Flatten).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

import graphopt
from graphopt.ir import ArrayTensor, Model, Node, Value

from .apply import set_const
from .calib import Sample, run_exposed
from .groups import DimKey
from .probe import ShapeTable
from .renorm import Moments, RenormResult, RenormTarget, channels_of, correct, renorm_targets

log = logging.getLogger(__name__)


@dataclass
class RefitResult:
    """One layer's refit: relative output error on the sampled rows before and after."""

    node: str
    rows: int
    error_before: float
    error_after: float


@dataclass
class _Target:
    node: Node
    x: Value
    axis: int  # channel axis of x
    wave: int


def targets(model: Model, shapes: ShapeTable, kept: Mapping[DimKey, np.ndarray]) -> list[_Target]:
    """Layers whose input channels were pruned (their waves are set by ``schedule``)."""
    return [t for t in (_as_target(node, shapes, kept) for node in model.graph) if t is not None]


def _as_target(node: Node, shapes: ShapeTable, kept: Mapping[DimKey, np.ndarray]) -> _Target | None:
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const is None:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const is None:  # computed: neither rewritable nor known to fit around
        return None
    x = node.inputs[0]
    w = node.inputs[1].const
    if node.op_type == "Conv" and int(node.attr("group", 1)) == 1 and len(w.shape) == 4:
        axis = 1
    elif node.op_type == "Gemm" and not int(node.attr("transA", 0)):
        axis = 1
    elif node.op_type == "MatMul" and len(w.shape) == 2:
        axis = -1
    else:
        return None
    shape = shapes.static(x)
    if shape is None:
        return None
    axis %= len(shape)
    return _Target(node, x, axis, 0) if (x.name, axis) in kept else None


# -- rows ------------------------------------------------------------------------------------------
def _conv_pads(node: Node, x_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int]) -> list[int]:
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            out = -(-x_hw[i] // s[i])
            total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - x_hw[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
        return pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    return list(node.attr("pads", [0, 0, 0, 0]))


def conv_rows(node: Node, x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` random output positions as (im2col patch rows of x, output rows of y)."""
    k = node.inputs[1].const.shape[2:]
    s, d = node.attr("strides", [1, 1]), node.attr("dilations", [1, 1])
    pt, pl, pb, pr = _conv_pads(node, x.shape[2:], k, s, d)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, _, ho, wo = y.shape
    flat = rng.choice(n * ho * wo, size=min(count, n * ho * wo), replace=False)
    bi, rest = np.divmod(flat, ho * wo)
    oy, ox = np.divmod(rest, wo)
    iy = oy[:, None] * s[0] + np.arange(k[0]) * d[0]
    ix = ox[:, None] * s[1] + np.arange(k[1]) * d[1]
    c = np.arange(x.shape[1])
    patches = xp[bi[:, None, None, None], c[None, :, None, None], iy[:, None, :, None], ix[:, None, None, :]]
    return patches.reshape(len(flat), -1), y[bi, :, oy, ox]


def dense_rows(x: np.ndarray, y: np.ndarray, axis: int, count: int, rng: np.random.Generator):
    xr = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    yr = y.reshape(-1, y.shape[-1]) if y.ndim > 1 else y[:, None]
    pick = rng.choice(len(xr), size=min(count, len(xr)), replace=False)
    return xr[pick], yr[pick]


# -- solve -----------------------------------------------------------------------------------------
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, w0: np.ndarray, intercept: bool = True, seed: int = 0):
    """argmin ||Y - X W - b||^2 + lam ||W - W0||^2, with lam picked on a held-out fifth of the rows.

    lam is relative to the mean input energy; "infinity" (keep the sliced W0, refit only b) competes
    too, so a layer with few rows (a Gemm after global pooling sees one row per image) cannot overfit.
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    val, fit = order[: len(x) // 5], order[len(x) // 5:]
    best = _ridge_path(x[fit], y[fit], w0, intercept, x[val], y[val]) if len(val) >= 4 else 1e-3
    return _ridge_solve(x, y, w0, intercept, [best])[0]


def _center(x: np.ndarray, y: np.ndarray, intercept: bool):
    if not intercept:
        return x, y, np.zeros(x.shape[1]), np.zeros(y.shape[1])
    xm, ym = x.mean(0), y.mean(0)
    return x - xm, y - ym, xm, ym


def _ridge_solve(x, y, w0, intercept, ridges):
    """[(W, b)] for each relative ridge (inf: W0) via one eigendecomposition of the Gram matrix."""
    xc, yc, xm, ym = _center(x, y, intercept)
    gram = xc.T @ xc
    scale = max(np.trace(gram) / max(gram.shape[0], 1), 1e-12)
    evals, evecs = np.linalg.eigh(gram)
    rhs = xc.T @ yc
    out = []
    for r in ridges:
        if np.isinf(r):
            w = w0
        else:
            lam = r * scale
            w = evecs @ ((evecs.T @ (rhs + lam * w0)) / (np.maximum(evals, 0) + lam)[:, None])
        out.append((w, ym - xm @ w))
    return out


def _ridge_path(x, y, w0, intercept, xv, yv) -> float:
    """The relative ridge (or inf) with the lowest error on the validation rows."""
    candidates = [*RIDGES, np.inf]
    errors = [np.linalg.norm(yv - xv @ w - b) for w, b in _ridge_solve(x, y, w0, intercept, candidates)]
    return candidates[int(np.argmin(errors))]


# -- per op: current (W, b) as a (cols, outs) matrix and writing it back --------------------------
def own_input(graph, node: Node, index: int) -> Value:
    """The node's input ``index`` as an initializer no other node reads (copied if shared)."""
    value = node.inputs[index]
    if len(value.uses()) > 1:
        copy = graph.add_initializer(ArrayTensor(value.const.numpy().copy(), graph.fresh_name(value.name)))
        node.set_input(index, copy)
        value = copy
    return value


def _bias_add(node: Node) -> tuple[Node, int] | None:
    """A MatMul's bias: the single following Add with a constant vector of the output width."""
    users = node.outputs[0].uses()
    if len(users) != 1 or users[0][0].op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add, slot = users[0]
    other = add.inputs[1 - slot]
    if other is None or other.const is None or other.const.shape[-1:] != node.inputs[1].const.shape[-1:] \
            or other.const.size != other.const.shape[-1]:
        return None
    return add, 1 - slot


def current(node: Node) -> tuple[np.ndarray, np.ndarray, bool]:
    """(W as (cols, outs), b, whether an intercept can be written) of a target layer."""
    w = node.inputs[1].const.numpy().astype(np.float64)
    if node.op_type == "Conv":
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        b = node.inputs[2].const.numpy() if has_bias else np.zeros(w.shape[0])
        return w.reshape(w.shape[0], -1).T, b.astype(np.float64), True
    if node.op_type == "Gemm":
        alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
        wm = alpha * (w.T if int(node.attr("transB", 0)) else w)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None:
            return wm, np.zeros(wm.shape[1]), True
        cv = c.const.numpy() if c.const is not None else None
        ok = cv is not None and cv.size == wm.shape[1]
        return wm, beta * (cv.reshape(-1) if ok else np.zeros(wm.shape[1])), ok
    return w, np.zeros(w.shape[1]), _bias_add(node) is not None


def write(node: Node, w: np.ndarray, b: np.ndarray | None) -> None:
    """Store refit weights (and the intercept ``b``; None leaves the bias as it is)."""
    graph = node.graph
    dtype = node.inputs[1].const.dtype
    if node.op_type == "Conv":
        shape = node.inputs[1].const.shape
        set_const(own_input(graph, node, 1), w.T.reshape((w.shape[1], *shape[1:])).astype(dtype))
        if b is None:
            return
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            set_const(own_input(graph, node, 2), b.astype(dtype))
        else:
            bias = graph.add_initializer(ArrayTensor(b.astype(dtype), graph.fresh_name(f"{node.inputs[1].name}.bias")))
            node.set_inputs([node.inputs[0], node.inputs[1], bias])
    elif node.op_type == "Gemm":
        alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
        wm = w / alpha
        set_const(own_input(graph, node, 1), (wm.T if int(node.attr("transB", 0)) else wm).astype(dtype))
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if b is None:
            return
        if c is None:
            bias = graph.add_initializer(ArrayTensor(b.astype(dtype), graph.fresh_name(f"{node.inputs[1].name}.bias")))
            node.set_inputs([node.inputs[0], node.inputs[1], bias])
            node.set_attr("beta", 1.0)
        else:
            set_const(own_input(graph, node, 2), (b / beta).reshape(c.const.shape).astype(dtype))
    else:
        set_const(own_input(graph, node, 1), w.astype(dtype))
        found = _bias_add(node)
        if found is not None and b is not None:
            add, slot = found
            old = add.inputs[slot].const.numpy()
            set_const(own_input(graph, add, slot), (old + b.reshape(old.shape)).astype(old.dtype))


def schedule(model: Model, refits: Sequence[_Target], renorms: Sequence[RenormTarget], sequential: bool) -> None:
    """Give every target its wave: one after the latest target upstream of it, so each wave reads activations
    already corrected by the waves before (refit targets all in wave 1 when not ``sequential``)."""
    by_node: dict[int, object] = {id(t.node): t for t in renorms}
    by_node.update({id(t.node): t for t in refits})
    level: dict[int, int] = {}
    for node in model.graph:
        upstream = max((level.get(id(v.producer), 0) for v in node.inputs if v is not None and v.producer), default=0)
        target = by_node.get(id(node))
        if target is not None:
            target.wave = upstream + 1 if sequential or isinstance(target, RenormTarget) else 1
        level[id(node)] = target.wave if target is not None else upstream


def reconstruct(model: Model, original: onnx.ModelProto, shapes: ShapeTable, kept: Mapping[DimKey, np.ndarray],
                feeds: Sequence[Sample], *, refit: bool = True, renorm: str | None = "variance",
                max_rows: int = 4096, sequential: bool = True,
                seed: int = 0) -> tuple[list[RefitResult], list[RenormResult]]:
    """Refit every layer that lost input channels (see the module docstring), then or in between re-estimate
    BatchNorm statistics (``renorm``: "variance" matches mean and std, "mean" only the mean, None skips; see
    ``renorm.py``). Returns per-layer refit errors and per-layer statistics before re-estimation."""
    found = targets(model, shapes, kept) if refit else []
    fixes = renorm_targets(model, {id(t.node) for t in found}) if renorm else []
    schedule(model, found, fixes, sequential)
    refits, renorms = [], []
    per_batch = max(1, -(-max_rows // max(len(feeds), 1)))
    for wave in sorted({t.wave for t in [*found, *fixes]}):
        group = [t for t in found if t.wave == wave]
        norms = [t for t in fixes if t.wave == wave]
        pruned = onnx.load_from_string(graphopt.to_bytes(model))
        from_pruned = [t.value.name for t in norms] + ([t.x.name for t in group] if sequential else [])
        from_original = [t.node.outputs[0].name for t in group] + [t.value.name for t in norms]
        if not sequential:
            from_original += [t.x.name for t in group]
        xs = run_exposed(pruned, from_pruned, feeds, label="pruned model (reconstruction)") if from_pruned \
            else ({} for _ in feeds)
        ys = run_exposed(original, from_original, feeds, label="model (reconstruction)")
        rows: list[tuple[list, list]] = [([], []) for _ in group]
        moments = [(Moments(), Moments(channels=channels_of(t, kept))) for t in norms]
        for batch, (vx, vy) in enumerate(zip(xs, ys, strict=True)):
            for index, t in enumerate(group):
                rng = np.random.default_rng([seed, wave, index, batch])
                x, y = (vx if sequential else vy)[t.x.name], vy[t.node.outputs[0].name]
                if not sequential:
                    x = np.take(x, kept[(t.x.name, t.axis)], axis=t.axis)
                out_axis = 1 if t.node.op_type in ("Conv", "Gemm") else y.ndim - 1
                if (t.node.outputs[0].name, out_axis) in kept:
                    y = np.take(y, kept[(t.node.outputs[0].name, out_axis)], axis=out_axis)
                if t.node.op_type == "Conv":
                    rx, ry = conv_rows(t.node, x, y, per_batch, rng)
                else:
                    rx, ry = dense_rows(x, y, t.axis, per_batch, rng)
                rows[index][0].append(rx)
                rows[index][1].append(ry)
            for t, (mp, mo) in zip(norms, moments, strict=True):
                mp.add(vx[t.value.name])
                mo.add(vy[t.value.name])
        for t, (rx, ry) in zip(group, rows, strict=True):
            refits.append(_refit(t.node, np.concatenate(rx), np.concatenate(ry), seed))
        for t, (mp, mo) in zip(norms, moments, strict=True):
            renorms.append(correct(t, mp, mo, variance=renorm == "variance"))
    return refits, renorms


def _refit(node: Node, x: np.ndarray, y: np.ndarray, seed: int) -> RefitResult:
    w0, b0, intercept = current(node)
    before = _rel_error(x @ w0 + b0, y)
    if intercept:
        w, b = ridge_fit(x, y, w0, True, seed)
    else:  # the bias cannot be rewritten per output (none, or a broadcast scalar): fit around it
        w, _ = ridge_fit(x, y - b0, w0, False, seed)
        b = b0
    after = _rel_error(x @ w + b, y)
    if not after < before:  # never make a layer worse than plain slicing did
        log.info("refit of %s did not help (%.4f -> %.4f); kept the sliced weights", node.label(), before, after)
        return RefitResult(node.label(), len(x), before, before)
    write(node, w, b if intercept else None)
    log.debug("refit %s on %d rows: relative error %.4f -> %.4f", node.label(), len(x), before, after)
    return RefitResult(node.label(), len(x), before, after)


def _rel_error(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(pred - ref) / max(np.linalg.norm(ref), 1e-12))
