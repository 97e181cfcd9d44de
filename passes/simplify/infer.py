"""infer-shapes: fill value types from onnx's shape inference and onnxruntime's symbolic one.

Why not only ``graphopt.shapes.infer_shapes``: its merge counts known dims,
so a dim that inference turns from ``unk__3`` into ``seq`` or ``1`` is not
taken, and those are exactly the facts shape folding needs (two Reshape
dims are the same when their names are). Here each dim is ranked
(unknown < generated name < named < number) and a value takes an inferred
type only where it is at least as specific in every dim.

onnxruntime's symbolic inference adds what onnx's cannot see (it evaluates
Slice/Concat/Shape chains with sympy), mostly on torchscript exports. It runs
without ``auto_merge``: merging two symbols at a broadcast assumes neither is
1 at run time, which is not lossless. Its public ``infer_shapes`` writes a
file into the working directory when inference is incomplete, so its steps
are driven here instead, and an incomplete result is still used. Only dims
that are numbers or expressions over the graph inputs' own dim names are
taken from it: its generated names depend on node positions, which change
between runs, and would alias.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Iterator

import onnx

from graphopt.ir import Model, TensorType, Value
from graphopt.ir.types import Dim, ValueType
from graphopt.onnx_io.exporter import Exporter
from graphopt.onnx_io.importer import Importer
from graphopt.pipeline import Pass, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)

SYMBOLIC_MAX_NODES = 20_000  # above this, onnxruntime's inference (pure Python, sympy: ~0.15-0.4 ms a node) is too slow
_SYMPY_FUNCTIONS = {"Min", "Max", "floor", "ceiling", "Mod", "Abs", "FloorDiv"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@register_pass
class InferShapes(Pass):
    name = "infer-shapes"
    description = "Fill value types from onnx shape inference (data propagation) and symbolic inference"
    lossless = True

    def __init__(self) -> None:
        self._seen: tuple | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # Inference exports the whole model (seconds on 200k nodes) and the pass manager calls every
        # pass once per iteration: skip a model whose nodes and initializers are the ones last inferred.
        seen = model_fingerprint(model)
        if seen == self._seen:
            return PassResult(0)
        symbolic = bool(ctx.option(self.name, "symbolic", True))
        limit = int(ctx.option(self.name, "symbolic_max_nodes", SYMBOLIC_MAX_NODES))
        changes = refine_shapes(model, symbolic=symbolic, symbolic_max_nodes=limit)
        self._seen = model_fingerprint(model)
        return PassResult(changes)


def model_fingerprint(model: Model) -> tuple:
    """Cheap identity of a model's current node and initializer set (to skip repeating inference)."""
    graphs = list(model.graphs())
    return (id(model), sum(len(g) for g in graphs), sum(id(n) for g in graphs for n in g),
            sum(len(g.initializers) for g in graphs))


def refine_shapes(model: Model, *, symbolic: bool = True, symbolic_max_nodes: int = SYMBOLIC_MAX_NODES) -> int:
    """Make value types more specific from inference; returns how many values changed."""
    proto = _inference_proto(model)
    importer = Importer(None)
    found: list[dict[str, ValueType]] = []
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        found.append({info.name: importer.value_type(info.type) for info in _value_infos(inferred.graph)})
    except Exception as err:  # noqa: BLE001 - onnx raises many types; inference is best effort
        log.warning("onnx shape inference failed: %s", err)
    if symbolic and sum(1 for _ in model.nodes()) <= symbolic_max_nodes:
        found.append(_symbolic(proto, importer))
    inputs = {id(v) for v in model.graph.inputs}
    by_name = {v.name: v for g in model.graph.walk_graphs() for v in g.values() if id(v) not in inputs}
    changed: set[str] = set()
    for types in found:
        for name, new_type in types.items():
            value = by_name.get(name)
            if value is not None and new_type is not None and _merge(value, new_type):
                changed.add(name)
    return len(changed)


def _inference_proto(model: Model, max_inline_bytes: int = 4096) -> onnx.ModelProto:
    """The model as inference needs it: no weights, and no value_info but what inference cannot derive.

    Like ``to_proto_without_weights`` (big initializers become typed inputs), but
    value_info is kept only for outputs of ops inference cannot see into (custom
    domains, model-local functions), which seed what follows them. Writing a
    ValueInfoProto per value was half the time on a 200k-node graph; what
    inference now derives less precisely, the merge keeps from the IR.
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
    for info in _value_infos(graph):
        value_type = importer.value_type(info.type)
        if isinstance(value_type, TensorType) and value_type.shape is not None:
            shape = tuple(d if not isinstance(d, str) or _over_inputs(d, allowed) else None for d in value_type.shape)
            value_type = TensorType(value_type.elem_type, shape)
        out[info.name] = value_type
    return out


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


def _rank(dim: Dim) -> int:
    if dim is None:
        return 0
    if isinstance(dim, str):
        return 1 if dim.startswith("unk__") else 2
    return 3


def _merge(value: Value, new: ValueType) -> bool:
    """Take ``new`` where it is more specific, dim by dim; never contradict what is known."""
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


def _value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from graph.value_info
    yield from graph.output
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _value_infos(sub)
