"""Concrete shapes of every value, from two onnxruntime runs at different symbolic sizes.

Why not ``infer_shapes``: exported transformers compute their reshape targets at
runtime (``Concat(Unsqueeze(batch), Unsqueeze(seq), 2, 32)``), so static
inference loses the head count and the broadcast dims of attention masks, and
the channel analysis needs both. Running the model once is exact; running it
twice with every symbolic dim bumped by one tells static dims (equal in both
runs) from dynamic ones (batch, sequence), which matters when a reshape is read
as a product of dims.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.ir import Model, Value
from graphopt.verify.inputs import generate_inputs, input_specs, resolve_shapes
from graphopt.verify.runtime import LoadedModel, open_session, run_session

log = logging.getLogger(__name__)

Pair = tuple[int, int]  # the size of one dim in probe A and in probe B
PROBE_HINT = ("give input sizes the model accepts (--shape NAME=DIMS or --shape DIM=N; PruneConfig(shapes=...)), "
              "or calibration data, whose first sample's shapes the probe then takes")


@dataclass
class ShapeTable:
    """Per value name, its shape in probe A and in probe B (same rank); ``feeds``: probe A's inputs, which the
    model is known to run on."""

    a: dict[str, tuple[int, ...]]
    b: dict[str, tuple[int, ...]]
    feeds: dict[str, np.ndarray]

    def pairs(self, value: Value | None) -> tuple[Pair, ...] | None:
        """The value's dims as (probe A, probe B) pairs; None when unknown (not a tensor, not reached)."""
        if value is None:
            return None
        if value.const is not None:
            return tuple((int(d), int(d)) for d in value.const.shape)
        sa, sb = self.a.get(value.name), self.b.get(value.name)
        if sa is None or sb is None or len(sa) != len(sb):
            return None
        return tuple(zip(sa, sb, strict=True))

    def static(self, value: Value | None) -> tuple[int | None, ...] | None:
        """The value's dims, None for a dim that differs between the probes (batch, sequence)."""
        pairs = self.pairs(value)
        return None if pairs is None else tuple(x if x == y else None for x, y in pairs)

    def concrete(self, value: Value) -> tuple[int, ...] | None:
        """Probe A's shape: symbolic dims at batch 1 and 8 for other names (or as the caller bound them)."""
        pairs = self.pairs(value)
        return None if pairs is None else tuple(x for x, _ in pairs)


def probe_inputs(proto: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[dict, dict]:
    """Two valid feed dicts: symbolic dims at their defaults (or as ``dims`` and ``shapes`` bind them, see
    ``resolve_shapes``), then each one larger by one."""
    specs = input_specs(proto)
    resolved = resolve_shapes(specs, shapes, dims)
    shapes_b = {
        spec.name: [size if isinstance(declared, int) else size + 1
                    for declared, size in zip(spec.dims or (), resolved[spec.name], strict=True)]
        for spec in specs
    }
    return generate_inputs(proto, shapes=resolved, seed=0), generate_inputs(proto, shapes=shapes_b, seed=1)


def probe_shapes(model: Model, proto: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> ShapeTable:
    """Run the model twice with every node output of the main graph exposed and record the shapes."""
    names = [
        out.name for node in model.graph for out in node.outputs
        if out.name and not out.is_graph_output()
    ]
    loaded = LoadedModel(proto)
    feeds_a, feeds_b = probe_inputs(proto, dims, shapes)
    tables = []
    with open_session(loaded, names, label="model (shape probe)") as sess:
        fetch = [o.name for o in sess.get_outputs()]
        for feeds in (feeds_a, feeds_b):
            values = run_session(sess, feeds, fetch, label="model on generated inputs (shape probe)",
                                 hint=PROBE_HINT)
            shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in values.items() if isinstance(v, np.ndarray)}
            shapes.update({k: tuple(int(d) for d in np.shape(v)) for k, v in feeds.items()})
            tables.append(shapes)
            del values
    log.debug("probed the shapes of %d values", len(tables[0]))
    return ShapeTable(*tables, feeds_a)
