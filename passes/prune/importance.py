"""How much each atom of a group matters, by weight magnitude, BatchNorm scale or calibration data.

The magnitude criteria follow torch-pruning's group importance (sum over every
weight slice the group removes: producers' output rows, consumers' input
columns, BN scales), so results are comparable side by side. The data-driven
criterion estimates what removing a channel costs the *next* layer:
``sqrt(E[x_c^2] * ||W[:, c]||^2)`` summed over consumers, i.e. the RMS of the
consumer-output change if the channel were zeroed; a group without a weighted
consumer falls back to the RMS activation of its producers' outputs. ``recon``
(``recon.py``) ranks by the output error left *after* least-squares refitting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from graphopt.errors import GraphoptError

from .groups import Analysis, ChannelGroup, DimKey
from .rules import BN_SCALE, W_IN, W_OUT, X_IN, Y_OUT

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn", "activation", "recon")


def _per_element(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    """sum |w|^p over every axis but ``axis``, one number per element along it."""
    moved = np.moveaxis(np.abs(array.astype(np.float64)), axis, 0).reshape(array.shape[axis], -1)
    return (moved**p).sum(axis=1)


def _accumulate(group: ChannelGroup, key: DimKey, per_element: np.ndarray) -> np.ndarray:
    pos = group.pos[key]
    valid = pos >= 0
    return np.bincount(pos[valid], weights=per_element[valid], minlength=group.n)


def _roles(analysis: Analysis, group: ChannelGroup, roles: set[str]):
    for key in group.dims:
        info = analysis.dims[key]
        for node, role in info.roles:
            if role in roles:
                yield key, info, node


def magnitude(analysis: Analysis, group: ChannelGroup, p: int, roles: set[str]) -> np.ndarray | None:
    """Group L1 (p=1) or squared-L2 (p=2) magnitude over the weight slices with the given roles."""
    score, found = np.zeros(group.n), False
    for key, info, _node in _roles(analysis, group, roles):
        if info.is_const:
            score += _accumulate(group, key, _per_element(info.value.const.numpy(), key[1], p))
            found = True
    return score if found else None


def activation(analysis: Analysis, group: ChannelGroup, stats: Mapping[DimKey, np.ndarray]) -> np.ndarray | None:
    """Estimated RMS change of the consumers' outputs when an atom is removed (see the module docstring)."""
    score, found = np.zeros(group.n), False
    for key, _info, node in _roles(analysis, group, {X_IN}):
        if key not in stats:
            continue
        weight_key = next((k for k, i, n in _roles(analysis, group, {W_IN}) if n is node and i.is_const), None)
        if weight_key is None:
            continue
        col = _per_element(analysis.dims[weight_key].value.const.numpy(), weight_key[1], 2)
        energy = stats[key]
        if col.shape == energy.shape:
            score += _accumulate(group, key, energy * col)
        else:  # e.g. a grouped conv: pair atoms, not elements
            score += _accumulate(group, key, energy) * _accumulate(group, weight_key, col)
        found = True
    if found:
        return np.sqrt(score)
    for key, _info, _node in _roles(analysis, group, {Y_OUT}):
        if key in stats:
            score += _accumulate(group, key, np.sqrt(stats[key]))
            found = True
    return score if found else None


def importance(analysis: Analysis, group: ChannelGroup, criterion: str,
               stats: Mapping[DimKey, np.ndarray] | None = None) -> np.ndarray:
    """One score per atom of ``group``; higher means keep."""
    if criterion not in CRITERIA:
        raise GraphoptError(f"unknown importance criterion {criterion!r}", hint=f"use one of {', '.join(CRITERIA)}")
    score = None
    if criterion in ("activation", "recon"):
        if stats is None:
            raise GraphoptError(f"the {criterion} criterion needs calibration data", hint="pass --calib DATA")
        if criterion == "recon":
            from .recon import recon_scores

            score = recon_scores(analysis, group, stats)
        if score is None:
            score = activation(analysis, group, {k: v[0] if isinstance(v, tuple) else v for k, v in stats.items()})
    elif criterion == "bn":
        score = magnitude(analysis, group, 1, {BN_SCALE})
    if criterion in ("l1", "l2") or score is None:
        if criterion not in ("l1", "l2"):
            log.info("group %s: no %s signal, ranking by L1 magnitude", group.name, criterion)
        score = magnitude(analysis, group, 2 if criterion == "l2" else 1, {W_OUT, W_IN, BN_SCALE})
    return score if score is not None else np.zeros(group.n)
