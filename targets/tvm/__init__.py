"""Compile ONNX models with Apache TVM (Relax) for CPU and CUDA, with MetaSchedule tuning.

    from graphopt.targets.tvm import compile_model, load
    compile_model("model.onnx", "model.tvm", target="cpu", tune_trials=256, db="tuning-db")
    outputs = load("model.tvm")(images=x)      # {output name: numpy array}

TVM is imported only when a function needs it (it takes ~1.5 s). See docs/tvm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .runtime import ArtifactError, Runner, is_artifact, load, read_manifest

if TYPE_CHECKING:
    from .build import CompileResult, compile_model
    from .frontend import UnsupportedModelError
    from .tune import RPCConfig, TuningReport

__all__ = ["ArtifactError", "CompileResult", "RPCConfig", "Runner", "TuningReport", "UnsupportedModelError",
           "compile_model", "is_artifact", "load", "read_manifest"]

_LAZY = {"compile_model": "build", "CompileResult": "build", "UnsupportedModelError": "frontend",
         "RPCConfig": "tune", "TuningReport": "tune"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
