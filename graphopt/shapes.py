"""Shape inference into the IR: onnx's inference (with data propagation) and, optionally, onnxruntime's
symbolic inference, merged dim by dim without ever contradicting what is known.

The merge ranks each dim (unknown < generated name ``unk__N`` < named < number) and a value takes an
inferred type only where it is at least as specific in every dim: a dim that inference turns from
``unk__3`` into ``seq`` or ``1`` is taken, and those are exactly the facts shape folding needs (two
Reshape dims are the same when their names are). Two sources that disagree on a named or numeric dim
leave the value as it was.

onnxruntime's symbolic inference adds what onnx's cannot see (it evaluates Slice/Concat/Shape chains with
sympy), mostly on torchscript exports. It runs without ``auto_merge``: merging two symbols at a broadcast
assumes neither is 1 at run time, which is not lossless. Its public ``infer_shapes`` writes a file into
the working directory when inference is incomplete, so its steps are driven here instead, and an
incomplete result is still used. Only dims that are numbers or expressions over the graph inputs' own dim
names are taken from it: its generated names depend on node positions, which change between runs, and
would alias. onnx's generated names (``unk__N``) are renamed for the same reason: each run counts from the
same start, so a value typed by an earlier run could share its name with another size (onnxruntime plans
buffers by dim names, and fails on such a file).

Inference exports the whole model (seconds on 200k nodes) and most passes call it to be sure of their
inputs' types; :func:`ensure_shapes` repeats it only when a value with an incomplete type is new, or its
producer was rewired, since the model's last inference.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
import math
import os
import re
import sys
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx

from .ir import Graph, Model, TensorType, Value
from .ir.types import Dim, ValueType
from .onnx_io.exporter import Exporter
from .onnx_io.importer import Importer
from .onnx_io.walk import graphs_within

log = logging.getLogger(__name__)

SYMBOLIC_MAX_NODES = 20_000  # above this, onnxruntime's inference (pure Python, sympy: ~0.15-0.4 ms a node) is too slow
_SYMPY_FUNCTIONS = {"Min", "Max", "floor", "ceiling", "Mod", "Abs", "FloorDiv"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class _Inferred:
    """What the last inference of a model left incomplete (kept alive, so the ids stay unique)."""

    incomplete: dict[tuple, Value]
    symbolic: bool


#: By the model's main graph (a Model, a dataclass, is not hashable).
_LAST: weakref.WeakKeyDictionary[Graph, _Inferred] = weakref.WeakKeyDictionary()


def infer_shapes(model: Model, *, symbolic: bool = False, symbolic_max_nodes: int = SYMBOLIC_MAX_NODES) -> int:
    """Make value types more specific from inference; returns how many values changed.

    Runs on a copy of the model without its large weights, so memory stays proportional to the graph,
    not the file. Failures of inference (unknown ops, inconsistent models) leave the model as it was.
    Graph inputs keep their declared types (they are the interface).
    """
    proto = _inference_proto(model)
    importer = Importer(None)
    found: list[dict[str, ValueType]] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        types = {info.name: importer.value_type(info.type) for info in _value_infos(inferred.graph)}
        found.append(_rename_generated(types, _dim_names(proto.graph), model))
    except Exception as err:  # noqa: BLE001 - onnx raises many types; inference is best effort
        log.warning("onnx shape inference failed: %s", err)
    symbolic = symbolic and sum(1 for _ in model.nodes()) <= symbolic_max_nodes
    if symbolic:
        found.append(_symbolic(proto, importer))
    inputs = {id(v) for v in model.graph.inputs}
    by_name = {v.name: v for g in model.graph.walk_graphs() for v in g.values() if id(v) not in inputs}
    changed: set[str] = set()
    for types in found:
        for name, new_type in types.items():
            value = by_name.get(name)
            if value is not None and new_type is not None and merge_type(value, new_type):
                changed.add(name)
    _LAST[model.graph] = _Inferred(_incomplete(model), symbolic)
    return len(changed)


def ensure_shapes(model: Model, *, symbolic: bool = False, symbolic_max_nodes: int = SYMBOLIC_MAX_NODES) -> int:
    """:func:`infer_shapes`, unless it cannot know more than it did last time on this model.

    That is when every value whose type is incomplete was incomplete after the last inference with its
    producer reading the same inputs, and that inference ran symbolic inference if this call asks for it
    (and the model is small enough). Returns how many values changed (0 when skipped).
    """
    last = _LAST.get(model.graph)
    if last is not None:
        wants_symbolic = symbolic and sum(1 for _ in model.nodes()) <= symbolic_max_nodes
        if (last.symbolic or not wants_symbolic) and _incomplete(model).keys() <= last.incomplete.keys():
            return 0
    return infer_shapes(model, symbolic=symbolic, symbolic_max_nodes=symbolic_max_nodes)


def _incomplete(model: Model) -> dict[tuple, Value]:
    """Node outputs of unknown type, rank or dims, keyed by the value and the inputs its producer reads."""
    found: dict[tuple, Value] = {}
    complete = _complete_shape
    for graph in model.graphs():
        for node in graph:
            for out in node.outputs:
                t = out.type
                if not isinstance(t, TensorType) or t.shape is None or not complete(t.shape):
                    found[(id(out), *map(id, node.inputs))] = out
    return found


@functools.lru_cache(maxsize=1 << 14)
def _complete_shape(shape: tuple[Dim, ...]) -> bool:
    return all(_rank(d) >= 2 for d in shape)


def _rank(dim: Dim) -> int:
    if dim is None:
        return 0
    if isinstance(dim, str):
        return 1 if dim.startswith("unk__") else 2
    return 3


def merge_type(value: Value, new: ValueType) -> bool:
    """Give ``value`` the type ``new`` where it is more specific, dim by dim; never contradict what is known.

    Returns whether the value's type changed.
    """
    old = value.type
    if old is None:
        value.type = new
        return True
    if not isinstance(new, TensorType) or not isinstance(old, TensorType) or new.shape is None:
        return False
    if old.elem_type != new.elem_type and old.elem_type:
        return False
    if old.shape is None:
        value.type = TensorType(new.elem_type, new.shape)
        return True
    if len(old.shape) != len(new.shape):
        return False
    dims, better = [], False
    for a, b in zip(old.shape, new.shape, strict=True):
        ra, rb = _rank(a), _rank(b)
        if ra >= 2 and rb >= 2 and a != b:
            return False  # two sources disagree: trust neither, keep what is there
        if rb > ra:
            dims.append(b)
            better = True
        else:
            dims.append(a)
    if better:
        value.type = TensorType(old.elem_type or new.elem_type, tuple(dims))
    return better


def _inference_proto(model: Model, max_inline_bytes: int = 4096) -> onnx.ModelProto:
    """The model as inference needs it: no weights, and no value_info but what inference cannot derive.

    Big initializers become typed inputs. value_info is kept only for outputs of ops inference cannot see
    into (custom domains, model-local functions), which seed what follows them. Writing a ValueInfoProto
    per value was half the time on a 200k-node graph; what inference now derives less precisely, the merge
    keeps from the IR.
    """
    exporter = Exporter()
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.functions.extend(exporter.function(f) for f in model.functions)
    graph, main = proto.graph, model.graph
    graph.name = main.name
    graph.input.extend(exporter.value_info(v) for v in main.inputs)
    graph.output.extend(exporter.value_info(v) for v in main.outputs)
    inputs = {id(v) for v in main.inputs}
    for value in main.initializers.values():
        tensor = value.const
        if math.prod(tensor.shape) * tensor.dtype.itemsize <= max_inline_bytes:
            graph.initializer.append(exporter.tensor(tensor, value.name))
        elif id(value) not in inputs:
            graph.input.append(exporter.value_info(value))
    graph.node.extend(exporter.node(n) for n in main)
    known: dict[tuple[str, str], bool] = {}
    for node in main:
        key = (node.domain, node.op_type)
        if key not in known:
            domain = "" if node.domain == "ai.onnx" else node.domain
            known[key] = model.function(node) is None and onnx.defs.has(node.op_type, domain)
        if not known[key]:
            graph.value_info.extend(exporter.value_info(o) for o in node.outputs if o.name and o.type is not None)
    return proto


def _rename_generated(types: dict[str, ValueType | None], seen: set[str], model: Model) -> dict:
    """``types`` with each ``unk__`` dim this inference run invented (not among ``seen``, the names the
    inference model carried) renamed to one that no dim of ``model`` has. One run's names stay one name
    each: what that run proved equal stays equal."""
    fresh: dict[str, str] = {}
    counter = itertools.count()
    taken: set[str] | None = None

    def rename(dim: Dim) -> Dim:
        nonlocal taken
        if not isinstance(dim, str) or not dim.startswith("unk__") or dim in seen:
            return dim
        if dim not in fresh:
            taken = _model_dim_names(model) | seen if taken is None else taken
            fresh[dim] = next(name for n in counter if (name := f"unk__{n}") not in taken)
        return fresh[dim]

    out = {}
    for name, value_type in types.items():
        if isinstance(value_type, TensorType) and value_type.shape is not None:
            value_type = TensorType(value_type.elem_type, tuple(rename(d) for d in value_type.shape))
        out[name] = value_type
    return out


def _dim_names(graph: onnx.GraphProto) -> set[str]:
    """The symbolic dim names a graph's declared types (inputs, outputs, value_info, subgraphs') use."""
    return {d.dim_param for g in graphs_within(graph) for info in (*g.input, *g.output, *g.value_info)
            if info.type.HasField("tensor_type") for d in info.type.tensor_type.shape.dim if d.dim_param}


def _model_dim_names(model: Model) -> set[str]:
    return {d for g in model.graph.walk_graphs() for v in g.values()
            if isinstance(v.type, TensorType) and v.type.shape is not None for d in v.type.shape if isinstance(d, str)}


def _symbolic(proto: onnx.ModelProto, importer: Importer) -> dict[str, ValueType]:
    engine_class = _symbolic_engine()
    if engine_class is None:
        return {}
    allowed = {d.dim_param for v in proto.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    engine = engine_class(int_max=2**31 - 1, auto_merge=False, guess_output_rank=False, verbose=0)
    sym_log = logging.getLogger(engine_class.__module__)
    level = sym_log.level
    sym_log.setLevel(logging.ERROR)  # "unsupported broadcast" warnings are expected without auto_merge
    try:
        engine._preprocess(proto)
        while engine.run_:
            engine._infer_impl()
        engine._update_output_from_vi()
        graph = engine.out_mp_.graph
    except Exception as err:  # noqa: BLE001 - best effort: the tool fails on ops it does not know
        log.debug("symbolic shape inference failed: %s", err)
        return {}
    finally:
        sym_log.setLevel(level)
    out: dict[str, ValueType] = {}
    untrusted = _ml_outputs(proto.graph)
    for info in _value_infos(graph):
        if info.name in untrusted:
            continue
        value_type = importer.value_type(info.type)
        if isinstance(value_type, TensorType) and value_type.shape is not None:
            shape = tuple(d if not isinstance(d, str) or _over_inputs(d, allowed) else None for d in value_type.shape)
            value_type = TensorType(value_type.elem_type, shape)
        out[info.name] = value_type
    return out


def _ml_outputs(graph: onnx.GraphProto) -> set[str]:
    """Outputs of ai.onnx.ml nodes: onnxruntime's symbolic inference gets some wrong (ArrayFeatureExtractor on
    1-D data returns [1, all indices], it says the indices' shape), and onnx's own inference covers them."""
    return {out for g in graphs_within(graph) for node in g.node if node.domain == "ai.onnx.ml" for out in node.output}


@functools.cache
def _symbolic_engine() -> type | None:
    """onnxruntime's SymbolicShapeInference class, loaded from its file.

    ``import onnxruntime.tools.symbolic_shape_infer`` runs ``onnxruntime/tools/__init__.py``,
    which imports torch when it is installed (seconds, and torch is no dependency of
    graphopt); the module itself needs only onnx, numpy and sympy.
    """
    name = "onnxruntime.tools.symbolic_shape_infer"
    module = sys.modules.get(name)
    if module is None:
        try:
            spec = importlib.util.find_spec("onnxruntime")
            path = os.path.join(os.path.dirname(spec.origin), "tools", "symbolic_shape_infer.py")
            file_spec = importlib.util.spec_from_file_location("graphopt_ort_symbolic_shape_infer", path)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - missing file or sympy: symbolic inference is optional
            log.info("onnxruntime's symbolic shape inference is not available: %s", err)
            return None
    return getattr(module, "SymbolicShapeInference", None)


def _over_inputs(dim: str, allowed: set[str]) -> bool:
    """Whether a symbolic dim is an expression over graph-input dim names only (stable across runs)."""
    if dim in allowed:
        return True
    names = set(_IDENT.findall(dim)) - _SYMPY_FUNCTIONS
    return bool(names) and names <= allowed


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    for g in graphs_within(graph):
        yield from g.value_info
        yield from g.output


def static_shape(value: Value, bindings: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
    """The value's shape with symbolic dims bound (default 1), or None if the rank or a dim is unknown."""
    if not isinstance(value.type, TensorType) or value.type.shape is None:
        return None
    dims = []
    for dim in value.type.shape:
        if isinstance(dim, str):
            dim = (bindings or {}).get(dim, 1)
        if dim is None:
            return None
        dims.append(int(dim))
    return tuple(dims)
