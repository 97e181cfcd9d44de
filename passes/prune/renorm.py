"""BatchNorm statistics re-estimated after pruning, for BN nodes and for BN folded into the layer before it.

Pruning, and the drift it leaves downstream, shifts and rescales the activations a BatchNorm normalizes,
while its running mean and variance still describe the unpruned network; re-estimating them on
calibration data (EagleEye's "adaptive BN") re-centres the pruned model. The statistics are matched
against the *unpruned model on the same calibration data* rather than against the stored ones, so the
calibration set need not follow the training distribution: per kept channel, the pruned BN's output gets
the mean (and, with ``variance``, the standard deviation) that the unpruned BN's output has there. On
training-distribution data this is exactly re-estimation (new running mean/var = the pruned activations'
moments). Exported graphs usually have BN folded into the conv (the dynamo exporter, onnxruntime's
optimizer); there the same per-channel correction goes into the conv's weights (scale) and bias (shift).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir import ArrayTensor, Model, Node, Value

from .apply import set_const
from .groups import DimKey

log = logging.getLogger(__name__)

BN_STATS = ("variance", "mean", "off")  # what PruneConfig.bn_stats may say
#: Fewer values per channel (calibration samples x positions) and the statistics are left as they are: a
#: mean of n values is off by std/sqrt(n), and re-centring on a handful fits those samples, not the data
#: (a random-weight HF ResNet at 32x32 with one sample, whose last stage is 1x1: held-out output cosine
#: 0.877 re-estimated, 0.921 not).
MIN_VALUES = 32
FOLDED = ("Conv", "Gemm")  # layers whose per-output-channel scale and bias stand in for a folded BN


@dataclass
class RenormResult:
    """One layer's channel statistics before the correction, relative to the unpruned model's."""

    node: str
    kind: str  # "batchnorm" or "folded"
    mean_shift: float  # mean over channels of |mean_pruned - mean_orig| / std_orig
    std_ratio: float  # geometric mean over channels of std_pruned / std_orig
    values: int = 0  # observed per channel
    applied: bool = True  # False: too few values (MIN_VALUES), the statistics were left as they were


@dataclass
class RenormTarget:
    node: Node
    value: Value  # whose per-channel moments are matched: the BN's input, or the folded layer's output
    folded: bool
    wave: int = 0


@dataclass
class Moments:
    """Running per-channel (axis 1) sums of x and x^2, in float64."""

    count: int = 0
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None
    channels: np.ndarray | None = field(default=None, repr=False)  # which channels of x to keep

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.channels is not None:
            x = np.take(x, self.channels, axis=1)
        rows = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        s, ss = rows.sum(axis=1), np.einsum("ij,ij->i", rows, rows)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.count += rows.shape[1]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / max(self.count, 1)
        return mean, np.sqrt(np.maximum(self.sumsq / max(self.count, 1) - mean**2, 0.0))


def renorm_targets(model: Model, skip: set[int] = frozenset()) -> list[RenormTarget]:
    """Every inference-mode BN, and every Conv/Gemm no BN follows (a folded one), except nodes in ``skip``
    (by id) and layers producing model outputs (those are the interface; refit handles them)."""
    found = []
    for node in model.graph:
        if id(node) in skip or not node.outputs or node.outputs[0].is_graph_output():
            continue
        if node.op_type == "BatchNormalization" and not int(node.attr("training_mode", 0)) \
                and all(v is not None and v.const is not None for v in node.inputs[1:5]):
            found.append(RenormTarget(node, node.inputs[0], False))
        elif node.op_type in FOLDED and _foldable(node):
            found.append(RenormTarget(node, node.outputs[0], True))
    return found


def _foldable(node: Node) -> bool:
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const is None:
        return False
    if node.op_type == "Gemm" and (int(node.attr("transA", 0)) or len(node.inputs) > 2 and node.inputs[2] is not None
                                   and (node.inputs[2].const is None or node.inputs[2].const.size == 1)):
        return False
    if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const is None:
        return False
    users = node.outputs[0].uses()
    return not any(user.op_type == "BatchNormalization" for user, _ in users)


def channels_of(target: RenormTarget, kept: Mapping[DimKey, np.ndarray]) -> np.ndarray | None:
    """The original channel of each channel the pruned value still has (None: all of them)."""
    return kept.get((target.value.name, 1))


def correct(target: RenormTarget, pruned: Moments, original: Moments, variance: bool = True) -> RenormResult:
    """Rewrite the target's statistics (or folded scale/bias) so its channel moments match the original's,
    given at least MIN_VALUES values per channel."""
    mu_p, sd_p = pruned.mean_std()
    mu_o, sd_o = original.mean_std()
    live = (sd_p > 1e-6 * max(float(sd_p.max(initial=0.0)), 1e-30)) & (sd_o > 0)
    ratio = np.where(live, sd_o / np.where(live, sd_p, 1.0), 1.0) if variance else np.ones_like(sd_p)
    node = target.node
    applied = pruned.count >= MIN_VALUES
    if applied and target.folded:
        _correct_folded(node, mu_p, mu_o, ratio)
    elif applied:
        _correct_batchnorm(node, mu_p, mu_o, ratio)
    scale = np.maximum(sd_o, 1e-12)
    ratios = np.where(live, sd_p / scale, 1.0)
    return RenormResult(node.label(), "folded" if target.folded else "batchnorm",
                        float(np.mean(np.abs(mu_p - mu_o) / scale)), float(np.exp(np.mean(np.log(ratios)))),
                        pruned.count, applied)


def _correct_batchnorm(node: Node, mu_p: np.ndarray, mu_o: np.ndarray, ratio: np.ndarray) -> None:
    """New (mean, var) with s' = s * ratio and s' (mu_p - mean') = s (mu_o - mean); gamma absorbs what a
    variance cannot (var' would drop below zero when the pruned channel is much quieter)."""
    gamma, mean, var = (node.inputs[i].const.numpy().astype(np.float64) for i in (1, 3, 4))
    eps = float(node.attr("epsilon", 1e-5))
    new_mean = mu_p - (mu_o - mean) / ratio
    new_var = (var + eps) / ratio**2 - eps
    low = new_var < 0.1 * var
    new_gamma = np.where(low, gamma * ratio, gamma)
    new_var = np.where(low, var, new_var)
    for index, array in ((1, new_gamma), (3, new_mean), (4, new_var)):
        _write(node, index, array)


def _correct_folded(node: Node, mu_p: np.ndarray, mu_o: np.ndarray, ratio: np.ndarray) -> None:
    """y' = ratio * (y - mu_p) + mu_o per output channel, folded into W and b."""
    w = node.inputs[1].const.numpy().astype(np.float64)
    if node.op_type == "Gemm":
        beta = float(node.attr("beta", 1.0))
        out_axis = 0 if int(node.attr("transB", 0)) else 1
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = beta * node.inputs[2].const.numpy().astype(np.float64).reshape(-1) if has_bias else 0.0
        bias = np.broadcast_to(bias, mu_p.shape)
        shape = [1, 1]
        shape[out_axis] = -1
        _write(node, 1, w * ratio.reshape(shape))
        new_bias = (ratio * (bias - mu_p) + mu_o) / (beta if has_bias else 1.0)
        if has_bias:
            _write(node, 2, new_bias.reshape(node.inputs[2].const.shape))
        else:
            _add_bias(node, new_bias)
            node.set_attr("beta", 1.0)
        return
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    bias = node.inputs[2].const.numpy().astype(np.float64) if has_bias else np.zeros(w.shape[0])
    _write(node, 1, w * ratio.reshape(-1, *([1] * (w.ndim - 1))))
    new_bias = ratio * (bias - mu_p) + mu_o
    if has_bias:
        _write(node, 2, new_bias)
    else:
        _add_bias(node, new_bias)


def _write(node: Node, index: int, array: np.ndarray) -> None:
    """Store ``array`` as the node's input ``index``, copying the initializer first if others read it."""
    value = node.inputs[index]
    dtype = value.const.dtype
    if len(value.uses()) > 1:
        value = node.graph.add_initializer(ArrayTensor(array.astype(dtype), node.graph.fresh_name(value.name)))
        node.set_input(index, value)
        return
    set_const(value, array.astype(dtype))


def _add_bias(node: Node, bias: np.ndarray) -> None:
    dtype = node.inputs[1].const.dtype
    value = node.graph.add_initializer(ArrayTensor(bias.astype(dtype), node.graph.fresh_name(f"{node.inputs[1].name}"
                                                                                              ".bias")))
    node.set_inputs([node.inputs[0], node.inputs[1], value])
