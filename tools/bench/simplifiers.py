"""Graph simplifiers compared by ``tools/bench_simplify.py``: each takes a model path and writes a model path.

Every adapter does the whole job a user would (load, simplify, save), because that is what is timed and
what the peak RSS covers. They run inside a :mod:`tools.bench.child` process, one tool per process.
ModelProto-based tools load external data with the model and write external data when the result would
exceed protobuf's 2 GiB limit.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Above this serialized size a ModelProto is saved with external data.
PROTO_EXTERNAL_ABOVE = 1_800_000_000


def save_proto(model: Any, dst: str) -> None:
    """``onnx.save`` with external data when the model is too large for one protobuf message."""
    import onnx

    if model.ByteSize() > PROTO_EXTERNAL_ABOVE:
        onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(dst).name + ".data")
    else:
        onnx.save(model, dst)


def _load(src: str) -> Any:
    import onnx

    return onnx.load(src)  # resolves external data relative to src


def run_onnxsim(src: str, dst: str) -> dict[str, Any]:
    import onnxsim

    model, check_ok = onnxsim.simplify(_load(src))
    save_proto(model, dst)
    return {"check_ok": bool(check_ok)}


def run_onnxslim(src: str, dst: str) -> dict[str, Any]:
    import onnxslim

    save_proto(onnxslim.slim(_load(src)), dst)
    return {}


def run_onnxoptimizer(src: str, dst: str) -> dict[str, Any]:
    import onnxoptimizer

    save_proto(onnxoptimizer.optimize(_load(src)), dst)
    return {}


def run_onnxscript(src: str, dst: str) -> dict[str, Any]:
    import onnxscript.optimizer

    save_proto(onnxscript.optimizer.optimize(_load(src)), dst)  # ModelProto in, ModelProto out (0.7.2)
    return {}


def run_ort_basic(src: str, dst: str, external_data: bool | None = None) -> dict[str, Any]:
    from .sessions import save_optimized

    save_optimized(src, dst, "basic", external_data=external_data)
    return {}


def run_graphopt(src: str, dst: str, level: str | None = None, target_runtime: str = "ort") -> dict[str, Any]:
    """graphopt's default pipeline (``level=None``), or every lossless pass up to ``level``, for
    ``target_runtime``."""
    import graphopt
    from graphopt.optimize import optimize

    model = graphopt.load(src)
    result = optimize(model, target_runtime=target_runtime, **({} if level is None else {"level": level}))
    graphopt.save(model, dst)
    return {
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "iterations": result.pipeline.iterations,
        "converged": result.pipeline.converged,
        "changes": {name: s.changes for name, s in result.pipeline.stats.items() if s.changes},
    }


def run_graphopt_simplify(src: str, dst: str) -> dict[str, Any]:
    """Only the passes that remove or fold redundancy: no fused (possibly runtime-specific) operators,
    which is the like-for-like comparison with the simplifiers."""
    return run_graphopt(src, dst, level="simplify")


#: graphopt's imports, including what its shape inference imports lazily on first use (onnxruntime's
#: symbolic shape inference pulls in sympy: 0.3-0.6 s once per process, which the peers' timings exclude
#: for their own imports too).
GRAPHOPT_IMPORTS = ("graphopt", "graphopt.optimize", "graphopt.passes", "onnxruntime.tools.symbolic_shape_infer")
#: tool name -> (adapter, modules to import before timing starts)
TOOLS: dict[str, tuple[Callable[[str, str], dict[str, Any]], tuple[str, ...]]] = {
    "onnxsim": (run_onnxsim, ("onnx", "onnxsim")),
    "onnxslim": (run_onnxslim, ("onnx", "onnxslim")),
    "onnxoptimizer": (run_onnxoptimizer, ("onnx", "onnxoptimizer")),
    "onnxscript": (run_onnxscript, ("onnx", "onnxscript.optimizer")),
    "ort_basic": (run_ort_basic, ("onnx", "onnxruntime")),
    "graphopt_simplify": (run_graphopt_simplify, GRAPHOPT_IMPORTS),
    "graphopt": (run_graphopt, GRAPHOPT_IMPORTS),
}
#: The graphopt variants: the default pipeline, and the simplification level alone.
GRAPHOPT = ("graphopt", "graphopt_simplify")
PEERS = tuple(name for name in TOOLS if name not in GRAPHOPT)


def run_tool(tool: str, src: str, dst: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Entry point for a child process: run ``tool`` on ``src``, writing ``dst`` (its folder is created).

    ``options`` go to the adapters that take them (facts about the source measured before timing starts,
    such as ``external_data`` for ``ort_basic``); the others ignore them.
    """
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    adapter, _ = TOOLS[tool]
    wanted = {k: v for k, v in (options or {}).items() if k in inspect.signature(adapter).parameters}
    return adapter(src, dst, **wanted)
