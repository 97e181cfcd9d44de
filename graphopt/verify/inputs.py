"""Inputs for verification runs: generated from the model's signature, or loaded and checked.

Generated inputs have to be *valid*, not just well typed, or both models fail
in the same way and nothing is verified:

* Shapes: static dims as declared; symbolic dims (``dim_param``) bound once
  per name so inputs that share ``batch`` or ``seq`` agree; the user's
  ``shapes`` (input name -> dims) and ``dims`` (dim_param -> size) win.
  Batch-like and unnamed dims default to 1, other named dims to
  :data:`SYMBOLIC_DIM_DEFAULT` (8): a size-1 sequence or channel axis makes
  softmax-over-the-wrong-axis and broadcasting bugs invisible.
* Integers are often token ids, gather indices or lengths: they are drawn from
  ``[0, 8)``, capped by the size of any table they index (a ``Gather``
  reached through casts and reshapes), and integers or bools named like
  ``*mask*`` are 0/1, mostly 1 with the first position of each row always 1,
  so no row is fully masked.
* Floats are standard normal. Every input draws from its own generator seeded
  by ``(seed, name)``, so results are reproducible and adding an input does
  not change the others.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.verify.errors import VerificationError
from graphopt.verify.runtime import RUN_HINT, LoadedModel, ModelLike, load_model

logger = logging.getLogger(__name__)

BATCH_DIM_DEFAULT = 1
SYMBOLIC_DIM_DEFAULT = 8
INT_RANGE_DEFAULT = (0, 8)
MASK_ZERO_FRACTION = 0.2
MAX_GENERATED_BYTES = 2**32  # an input declared larger than this is a mistake or needs --shape

Dim = int | str | None
_BATCH_DIM = re.compile(r"batch|^(n|b|bs)$", re.IGNORECASE)
_WORDS = np.array(["a", "graph", "optimizer", "onnx", "verify", "x"], dtype=object)
# Ops that pass index values through unchanged, so a Gather behind them still bounds the input.
_VALUE_PRESERVING = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose"}
_INDEXING = {"Gather": 0, "GatherElements": 0}  # op -> default axis of the indexed table


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the model declares it; ``dims`` is None for unknown rank."""

    name: str
    dtype: np.dtype | None
    dims: tuple[Dim, ...] | None
    type_name: str = "tensor"

    def describe(self) -> str:
        """Human-readable signature, e.g. ``float32[batch,3]``."""
        dtype = "string" if self.dtype is not None and self.dtype.kind == "O" else str(self.dtype)
        dims = "?" if self.dims is None else ",".join("?" if d is None else str(d) for d in self.dims)
        return f"{dtype}[{dims}]" if self.type_name == "tensor" else self.type_name


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed: initializer-backed inputs (old IR versions) are skipped."""
    graph = model.graph
    initialized = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [_spec(vi) for vi in graph.input if vi.name not in initialized]


def _spec(vi: onnx.ValueInfoProto) -> InputSpec:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return InputSpec(vi.name, None, None, type_name=kind or "undefined")
    tensor = vi.type.tensor_type
    if tensor.elem_type == onnx.TensorProto.UNDEFINED:
        return InputSpec(vi.name, None, None, type_name="tensor of undefined element type")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    if not tensor.HasField("shape"):
        return InputSpec(vi.name, dtype, None)
    return InputSpec(vi.name, dtype, tuple(_dim(d) for d in tensor.shape.dim))


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return dim.dim_value
    return dim.dim_param or None


def resolve_shapes(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input, binding each dim_param to one value across inputs. ``shapes`` may
    also name a dim_param with one size (``{"batch": [8]}``, as ``--shape batch=8`` gives it)."""
    by_name = {s.name: s for s in specs}
    symbolic = {d for s in specs for d in (s.dims or ()) if isinstance(d, str)}
    bindings: dict[str, int] = dict(dims or {})
    for name, shape in dict(shapes or {}).items():
        if name in by_name:
            continue
        if name not in symbolic or len(shape) != 1:
            dim_names = ", ".join(sorted(symbolic)) or "-"
            raise VerificationError(f"a shape is given for {name!r}, which is neither an input nor a symbolic dim",
                                    hint=f"inputs: {_names(specs)}; symbolic dims: {dim_names}")
        if bindings.setdefault(name, int(shape[0])) != int(shape[0]):
            raise VerificationError(f"symbolic dim {name!r} is given as {shape[0]} and as {bindings[name]}")
    shapes = {name: shape for name, shape in (shapes or {}).items() if name in by_name}
    for name, shape in shapes.items():
        _bind_user_shape(by_name[name], [int(d) for d in shape], bindings)
    resolved = {}
    for spec in specs:
        if spec.name in shapes:
            resolved[spec.name] = tuple(int(d) for d in shapes[spec.name])
        elif spec.dims is None:
            hint = f"give its shape: {spec.name}=d0,d1,..."
            raise VerificationError(f"input {spec.name!r} has unknown rank", hint=hint)
        else:
            resolved[spec.name] = tuple(_concrete(d, bindings) for d in spec.dims)
    return resolved


def _bind_user_shape(spec: InputSpec, shape: list[int], bindings: dict[str, int]) -> None:
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise VerificationError(
            f"shape {shape} for input {spec.name!r} has rank {len(shape)}, expected {spec.describe()}"
        )
    for declared, given in zip(spec.dims, shape, strict=True):
        if isinstance(declared, int) and declared != given:
            raise VerificationError(
                f"shape {shape} for input {spec.name!r} contradicts its static shape {spec.describe()}"
            )
        if isinstance(declared, str) and bindings.setdefault(declared, given) != given:
            raise VerificationError(
                f"shape {shape} for input {spec.name!r} binds {declared!r}={given}, "
                f"but it is already {bindings[declared]}"
            )


def _concrete(dim: Dim, bindings: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    if dim is None:
        return BATCH_DIM_DEFAULT
    default = BATCH_DIM_DEFAULT if _BATCH_DIM.search(dim) else SYMBOLIC_DIM_DEFAULT
    return bindings.setdefault(dim, default)


def generate_inputs(
    model: ModelLike | LoadedModel,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    *,
    dims: Mapping[str, int] | None = None,
    value_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Valid random inputs for every graph input of ``model`` (see the module docstring).

    ``shapes`` maps input names to concrete shapes, ``dims`` binds symbolic dim
    names (``{"batch": 2}``) and ``value_ranges`` maps input names to a half-open
    ``[low, high)`` range that replaces the default distribution.
    """
    proto = load_model(model).proto
    specs = input_specs(proto)
    for spec in specs:
        if spec.dtype is None:
            raise VerificationError(
                f"cannot generate input {spec.name!r} of type {spec.type_name}", hint="pass inputs explicitly"
            )
    resolved = resolve_shapes(specs, shapes, dims)
    ranges = dict(value_ranges or {})
    unknown = set(ranges) - {s.name for s in specs}
    if unknown:
        raise VerificationError(f"value range given for {sorted(unknown)}, not inputs: {_names(specs)}")
    for spec in specs:
        shape = resolved[spec.name]
        if any(d < 0 for d in shape):
            raise VerificationError(f"input {spec.name!r} has a negative dim: {list(shape)}", hint=RUN_HINT)
        if (size := math.prod(shape) * 8) > MAX_GENERATED_BYTES:  # drawn as float64 first
            raise VerificationError(f"input {spec.name!r} of shape {list(shape)} would take {size / 2**30:.0f} GiB "
                                    "to generate", hint=RUN_HINT)
    bounds = index_bounds(proto.graph)
    result = {}
    for spec in specs:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        value_range, bound = ranges.get(spec.name), bounds.get(spec.name)
        result[spec.name] = _sample(spec, resolved[spec.name], rng, value_range, bound)
    logger.debug("generated inputs: %s", {k: (v.dtype.name, v.shape) for k, v in result.items()})
    return result


def _sample(
    spec: InputSpec,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    value_range: tuple[float, float] | None,
    bound: int | None,
) -> np.ndarray:
    dtype = spec.dtype
    assert dtype is not None
    if dtype.kind == "O":
        return rng.choice(_WORDS, size=shape)
    if value_range is not None:
        low, high = value_range
        if dtype.kind in "iub":
            return _checked_ints(spec, rng.integers(int(low), int(high), size=shape), dtype)
        return rng.uniform(low, high, size=shape).astype(dtype)
    if "mask" in spec.name.lower() and dtype.kind in "iub":
        return _mask(shape, rng).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        low, high = INT_RANGE_DEFAULT
        high = min(high, bound) if bound else high
        return rng.integers(low, high, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    mask = rng.random(shape) >= MASK_ZERO_FRACTION
    if mask.ndim and mask.shape[-1]:  # every row keeps its first position
        mask[..., 0] = True
    return mask


def _checked_ints(spec: InputSpec, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if values.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise VerificationError(f"value range for input {spec.name!r} does not fit its dtype {dtype}")
    return values.astype(dtype)


def index_bounds(graph: onnx.GraphProto) -> dict[str, int]:
    """Upper bounds for integer inputs that index a table of known size.

    Follows each input through value-preserving ops (casts, reshapes) to the
    indices slot of ``Gather``/``GatherElements`` nodes whose table has a static
    size along the gathered axis; the smallest such size is the bound.
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
    static = _static_shapes(graph)
    bounds = {}
    for vi in graph.input:
        sizes = [s for s in _indexed_sizes(vi.name, consumers, static) if s > 0]
        if sizes:
            bounds[vi.name] = min(sizes)
    return bounds


def _indexed_sizes(
    start: str, consumers: Mapping[str, list[tuple[onnx.NodeProto, int]]], static: Mapping[str, list[Dim]]
) -> list[int]:
    sizes, seen, todo = [], {start}, [start]
    while todo:
        for node, slot in consumers.get(todo.pop(), []):
            if node.op_type in _VALUE_PRESERVING and slot == 0 and node.domain in ("", "ai.onnx"):
                fresh = [o for o in node.output if o and o not in seen]
                seen.update(fresh)
                todo.extend(fresh)
            elif node.op_type in _INDEXING and slot == 1:
                size = _axis_size(node, static.get(node.input[0]))
                if size is not None:
                    sizes.append(size)
    return sizes


def _axis_size(node: onnx.NodeProto, shape: list[Dim] | None) -> int | None:
    if not shape:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), _INDEXING[node.op_type])
    if not -len(shape) <= axis < len(shape):
        return None
    size = shape[axis]
    return size if isinstance(size, int) else None


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[Dim]]:
    shapes: dict[str, list[Dim]] = {}
    for vi in [*graph.input, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [_dim(d) for d in vi.type.tensor_type.shape.dim]
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                shapes[node.output[0]] = list(value.dims)
    return shapes


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read named input arrays from an ``.npz`` file (as written by ``np.savez``)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise VerificationError(f"inputs file {str(path)!r} does not exist") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise VerificationError(f"cannot read inputs file {str(path)!r}: {exc}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise VerificationError(
            f"inputs file {str(path)!r} holds a single array, not named inputs",
            hint="save them with np.savez(path, name=array, ...)",
        )
    with data:
        return {name: data[name] for name in data.files}


def check_inputs(model: ModelLike | LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check user inputs against the model's signature and return them ready to feed.

    Every required input must be present with the declared dtype, rank and
    static dims; names that are not graph inputs are rejected. String arrays
    are converted to the object arrays onnxruntime expects.
    """
    proto = load_model(model).proto
    specs = input_specs(proto)
    all_inputs = {vi.name for vi in proto.graph.input}
    extra = sorted(set(inputs) - all_inputs)
    if extra:
        raise VerificationError(f"inputs {extra} are not inputs of the model; it takes {_names(specs)}")
    missing = [s for s in specs if s.name not in inputs]
    if missing:
        wanted = ", ".join(f"{s.name!r} ({s.describe()})" for s in missing)
        raise VerificationError(f"missing input {wanted}")
    by_name = {s.name: s for s in specs}
    return {name: _checked_value(by_name.get(name), name, value) for name, value in inputs.items()}


def _checked_value(spec: InputSpec | None, name: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if spec is None or spec.dtype is None:  # an initializer override or a non-tensor input
        return array
    if spec.dtype.kind == "O":
        if array.dtype.kind not in "OUS":
            raise VerificationError(f"input {name!r} has dtype {array.dtype}, the model expects string")
        array = array.astype(object)
    elif array.dtype != spec.dtype:
        raise VerificationError(
            f"input {name!r} has dtype {array.dtype}, the model expects {spec.describe()}"
        )
    if spec.dims is not None:
        if array.ndim != len(spec.dims):
            raise VerificationError(
                f"input {name!r} has shape {list(array.shape)} (rank {array.ndim}), "
                f"the model expects {spec.describe()}"
            )
        for declared, actual in zip(spec.dims, array.shape, strict=True):
            if isinstance(declared, int) and declared != actual:
                raise VerificationError(
                    f"input {name!r} has shape {list(array.shape)}, the model expects {spec.describe()}"
                )
    return array


def _names(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} ({s.describe()})" for s in specs) or "(none)"
