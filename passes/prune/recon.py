"""The ``recon`` criterion: keep the channels the next layer cannot do without, *after* refitting.

Removing channel c and then refitting the consumer by least squares (as
``reconstruct`` does) costs ``||W'_c||^2 / P_cc`` in output energy, where P is
the inverse covariance of the consumer's input channels and W' the consumer
weights already compensated for the channels removed before (the classic
backward-elimination step of linear regression). Greedy elimination with
rank-one updates ranks every channel in O(C^3), which is what the channel
pruning of He et al. (2017) approximates with LASSO. Channels that are linear
combinations of others (an expand conv's outputs, dead ReLUs) go first; a
channel that carries information nobody else has stays, however small its
weights are. A kxk conv consumer is treated tap by tap (channel covariance
over positions, each tap's weights as extra outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from .groups import Analysis, ChannelGroup, DimKey
from .rules import W_IN, X_IN

log = logging.getLogger(__name__)


def consumer_matrix(analysis: Analysis, group: ChannelGroup, x_key: DimKey) -> np.ndarray | None:
    """The weights of every layer that reads ``x_key`` as (input channels, outputs), stacked side by side."""
    blocks = []
    for node, role in analysis.dims[x_key].roles:
        if role != X_IN:
            continue
        w_key = next((k for k in group.dims for n, r in analysis.dims[k].roles if n is node and r == W_IN), None)
        if w_key is None or not analysis.dims[w_key].is_const:
            continue
        w = analysis.dims[w_key].value.const.numpy().astype(np.float64)
        cols = np.moveaxis(w, w_key[1], 0).reshape(w.shape[w_key[1]], -1)
        if cols.shape[0] != analysis.dims[x_key].size:
            return None  # grouped conv: channels and weight rows do not pair up
        blocks.append(cols)
    return np.concatenate(blocks, axis=1) if blocks else None


def greedy_order(cov: np.ndarray, weights: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates in the order backward elimination removes them (least costly first)."""
    n = cov.shape[0]
    prec = np.linalg.inv(cov + (1e-6 * max(np.trace(cov) / n, 1e-12)) * np.eye(n))
    w = weights.copy()
    alive = np.ones(n, dtype=bool)
    is_candidate = np.zeros(n, dtype=bool)
    is_candidate[candidates] = True
    order = []
    for _ in range(len(candidates)):
        diag = np.diag(prec)
        cost = np.where(alive & is_candidate, (w**2).sum(axis=1) / np.maximum(diag, 1e-30), np.inf)
        c = int(np.argmin(cost))
        order.append(c)
        col = prec[:, c] / prec[c, c]
        w -= np.outer(col, w[c])  # the others take over what c did
        prec -= np.outer(col, prec[c])
        alive[c] = False
        w[c], prec[c], prec[:, c] = 0.0, 0.0, 0.0
        prec[c, c] = 1.0
    return np.asarray(order)


def recon_scores(analysis: Analysis, group: ChannelGroup, stats: Mapping[DimKey, object]) -> np.ndarray | None:
    """One score per atom (its position in the elimination order), or None when the criterion does not apply."""
    best = None
    for key in group.dims:
        entry = stats.get(key)
        if not isinstance(entry, tuple) or not any(r == X_IN for _, r in analysis.dims[key].roles):
            continue
        pos = group.pos[key]
        if (pos >= 0).sum() != group.n:  # atoms wider than one element: no per-channel answer
            continue
        weights = consumer_matrix(analysis, group, key)
        if weights is not None and (best is None or weights.shape[1] > best[2].shape[1]):
            best = (key, entry[1], weights)
    if best is None:
        return None
    key, cov, weights = best
    pos = group.pos[key]
    order = greedy_order(cov, weights, np.nonzero(pos >= 0)[0])
    scores = np.zeros(group.n)
    scores[pos[order]] = np.arange(len(order))
    return scores
