"""Metadata for zoo models: what a model is, what it takes as input, how to fake valid inputs.

Kept free of torch/onnx imports so that listing the zoo or generating inputs is instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Exporter = Literal["dynamo", "torchscript", "onnx", "skl2onnx"]
#: A builder writes the model to the given ``.onnx`` path and returns extra sidecar metadata.
Builder = Callable[["ZooModel", Path], dict[str, Any]]


@dataclass(frozen=True)
class InputSpec:
    """Shape, dtype and value domain of one model input.

    ``value_range`` is ``[low, high)``: for integer inputs it bounds valid values (token ids below the
    vocabulary size), for float inputs it selects uniform sampling instead of a standard normal.
    ``kind="mask"`` marks a 0/1 attention mask, filled as right-padded rows that are never all zero.
    ``dynamic_axes`` maps axis index to a symbolic name ("batch", "seq"); ``second_shape`` is another
    valid shape that differs on those axes, so dynamic-shape handling can be exercised.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    second_shape: tuple[int, ...] | None = None
    value_range: tuple[float, float] | None = None
    kind: Literal["data", "mask"] = "data"
    dynamic_axes: Mapping[int, str] = field(default_factory=dict)

    @property
    def is_dynamic(self) -> bool:
        return bool(self.dynamic_axes)


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry. ``config`` is everything that determines the model's content: it enters the cache key."""

    name: str
    family: str
    exporter: Exporter
    inputs: dict[str, InputSpec]
    outputs: dict[str, Mapping[int, str]]
    builder: Builder = field(repr=False, compare=False)
    config: Mapping[str, Any] = field(default_factory=dict)
    full_size: bool = False
    tags: frozenset[str] = frozenset()
    dataset: str | None = None
    description: str = ""
    skip_reason: str | None = None

    @property
    def is_dynamic(self) -> bool:
        return any(spec.is_dynamic for spec in self.inputs.values())


def _mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Right-padded 0/1 mask: row 0 is full, other rows keep at least half of the tokens."""
    mask = np.ones(shape, dtype=np.int64)
    batch, seq = shape[0], shape[-1]
    for row in range(1, batch):
        mask[row, int(rng.integers(max(1, seq // 2), seq + 1)) :] = 0
    return mask


def make_input(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random array that is valid for ``spec`` at ``shape``."""
    dtype = np.dtype(spec.dtype)
    if spec.kind == "mask":
        return _mask(shape, rng).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        low, high = spec.value_range or (0, 2)
        return rng.integers(int(low), int(high), size=shape).astype(dtype)
    if spec.value_range is not None:
        low, high = spec.value_range
        return rng.uniform(low, high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def make_inputs(model: ZooModel, *, second: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Feed dict for onnxruntime: at each input's default shape, or at ``second_shape`` when asked.

    Inputs without a ``second_shape`` keep their default shape, so ``second=True`` is always valid.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in model.inputs.items():
        shape = spec.second_shape if second and spec.second_shape is not None else spec.shape
        feeds[name] = make_input(spec, shape, rng)
    return feeds
