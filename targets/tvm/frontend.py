"""graphopt model -> TVM Relax IRModule, through ``tvm.relax.frontend.onnx.from_onnx``.

Route (measured on the small zoo models, see docs/tvm.md): shapes the user gives are written into
the graph's input types first, then graphopt's ``simplify`` pipeline folds the shape arithmetic
(Shape/Gather/Concat chains, constant masks) that TVM's ONNX importer cannot follow symbolically.
Raw exported BERT/MiniLM/GPT-2 fail to import even with ``shape_dict``; simplified with static
inputs they import. Dims the user leaves open stay named symbolic dims (``batch``, ``seq``).

Every op is checked against the importer's converter map before anything else runs, so an
unsupported model fails in milliseconds with one error naming each unsupported op type and a node.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import Model, TensorType
from graphopt.onnx_io import ModelLike, load, to_proto

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")


class UnsupportedModelError(GraphoptError):
    """The model uses ops (or types) that TVM's ONNX importer cannot convert."""


@dataclass
class TensorSpec:
    """A graph input or output as the artifact's manifest records it: dims are ints or symbol names."""

    name: str
    dtype: str
    shape: list[int | str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


def supported_ops() -> frozenset[str]:
    """ONNX op types (default domain) that TVM's Relax ONNX importer converts."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return frozenset(_get_convert_map())


def check_supported(model: Model) -> None:
    """Raise one :class:`UnsupportedModelError` listing every op type TVM cannot import, with a node of each."""
    known = supported_ops()
    first: dict[str, str] = {}
    for node in model.graph:
        if node.domain not in ONNX_DOMAINS or node.op_type not in known:
            first.setdefault(node.qualified_op, node.name or f"<unnamed {node.op_type}>")
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.type is not None and not isinstance(value.type, TensorType):
            kind = type(value.type).__name__.removesuffix("Type").lower()
            raise UnsupportedModelError(f"graph input/output {value.name!r} is not a tensor (its type is {kind}); "
                                        "TVM's importer takes tensors only")
    if first:
        listed = ", ".join(f"{op} (node {name!r})" for op, name in sorted(first.items()))
        raise UnsupportedModelError(
            f"TVM's ONNX importer does not support: {listed}",
            hint="compile a model without these ops (control flow, ML-domain and QLinear*/ConvInteger ops "
                 "are not converted; keep quantized models in QDQ form)",
        )


def bind_shapes(model: Model, shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Write user shapes into the graph inputs: ``{input: [dims]}`` fixes an input, ``{dim_name: [n]}`` a symbol."""
    if not shapes:
        return
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    symbols = {d for v in inputs.values() if isinstance(v.type, TensorType) for d in (v.type.shape or ()) if
               isinstance(d, str)}
    for key in shapes:
        if key not in inputs and key not in symbols:
            raise GraphoptError(f"--shape {key}: no graph input or symbolic dim of that name",
                                hint=f"inputs: {', '.join(inputs)}; symbolic dims: {', '.join(sorted(symbols)) or '-'}")
    for name, value in inputs.items():
        vtype = value.type
        if not isinstance(vtype, TensorType) or vtype.shape is None:
            if name in shapes:
                value.type = TensorType(vtype.elem_type if vtype else onnx.TensorProto.FLOAT, tuple(shapes[name]))
            continue
        if name in shapes:
            dims = tuple(int(d) for d in shapes[name])
            if len(dims) != len(vtype.shape) or any(isinstance(d, int) and d != n for d, n in zip(vtype.shape, dims,
                                                                                                   strict=True)):
                raise GraphoptError(f"--shape {name}={'x'.join(map(str, dims))} does not fit the input's shape "
                                    f"{list(vtype.shape)}")
        else:
            dims = tuple(int(shapes[d][0]) if isinstance(d, str) and d in shapes else d for d in vtype.shape)
        value.type = TensorType(vtype.elem_type, dims)


def prepare(model: Model | ModelLike, shapes: Mapping[str, Sequence[int]] | None = None,
            simplify: bool = True) -> onnx.ModelProto:
    """The model ready for import: ops checked, user shapes bound, simplified (a copy; the input is not touched)."""
    from graphopt.optimize import optimize

    graph_model = load(model if not isinstance(model, Model) else to_proto(model))
    check_supported(graph_model)
    bind_shapes(graph_model, shapes)
    if simplify:
        optimize(graph_model, level="simplify")
        check_supported(graph_model)  # simplify only removes ops, but a plugin pass could add some
    return to_proto(graph_model)


def signature(proto: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (without initializers) and outputs with dtype and shape as the graph declares them."""
    inits = {t.name for t in proto.graph.initializer}
    return ([_spec(v) for v in proto.graph.input if v.name not in inits], [_spec(v) for v in proto.graph.output])


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.elem_type:
        raise UnsupportedModelError(f"graph input/output {vi.name!r} is not a typed tensor")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    shape: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{_sanitize(vi.name)}_dim{i}"))
    return TensorSpec(vi.name, dtype, shape)


def relax_output_shapes(mod) -> list[list[int | str] | None]:
    """Output shapes as the imported module computes them (ints, symbol names, or a symbolic
    expression's text), None where unknown: more precise than the ONNX graph's declared outputs."""
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    shapes: list[list[int | str] | None] = []
    for ty in fields:
        values = getattr(getattr(ty, "shape", None), "values", None)
        shapes.append(None if values is None else [int(v.value) if hasattr(v, "value") else str(v)
                                                   for v in values])
    return shapes


def _sanitize(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def to_relax(proto: onnx.ModelProto):
    """Import a prepared model into a Relax IRModule (``main`` takes the graph inputs in order)."""
    from tvm.relax.frontend.onnx import from_onnx

    inputs, _ = signature(proto)
    shape_dict = {s.name: s.shape for s in inputs if all(isinstance(d, int) for d in s.shape)}
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")  # onnx.checker's complaints are printed as warnings by the importer
            return from_onnx(proto, shape_dict=shape_dict or None, dtype_dict={s.name: s.dtype for s in inputs})
    except Exception as exc:  # noqa: BLE001 - the importer raises TVMError, ValueError, AssertionError, ...
        where = captured.getvalue().strip().splitlines()
        op = where[0].split(",")[0].removeprefix("Error converting operator ") if where else "?"
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise UnsupportedModelError(
            f"TVM's ONNX importer failed converting a {op} node: {last}",
            hint="a common cause is a dynamic shape the importer cannot follow: bind it with --shape NAME=DIMS",
        ) from None
