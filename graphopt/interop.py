"""Bridges to onnx-graphsurgeon, for users who want its API (e.g. ``Graph.fold_constants``).

graphopt's IR is its own rather than graphsurgeon's because a graphsurgeon
round trip is not lossless (measured on tests/test_onnx_io.py's kitchen-sink
model with onnx-graphsurgeon 0.6.1): it drops the model's doc string, domain,
model_version and metadata, graph and node metadata, node doc strings and
unused initializers, and fails on string attributes that are not UTF-8. Going
through graphsurgeon therefore costs those; graphopt's own load/save keep them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .ir import Model
from .onnx_io import load, to_proto


def to_graphsurgeon(model: Model) -> gs.Graph:
    """The model as an onnx-graphsurgeon Graph (weights materialized, as graphsurgeon needs)."""
    return gs.import_onnx(to_proto(model))


def from_graphsurgeon(graph: gs.Graph) -> Model:
    """A graphsurgeon Graph back into graphopt's IR."""
    return load(gs.export_onnx(graph))
