"""CUDA kernels compiled ahead of time, so a CUDA artifact runs on a GPU machine without NVRTC or headers.

TVM stores a CUDA module as CUDA C source when it is built on a machine with no GPU, and its runtime
compiles that source when the library is loaded (the ``tvm_callback_cuda_compile`` hook, NVRTC by
default, which needs ``cuda-bindings`` *and* the CUDA/CCCL headers on the GPU machine). When ``nvcc``
is available at compile time, :func:`precompile` builds a fatbin for the target's arch and the
artifact carries it; the runner (``runtime.py``) answers the hook with it for that exact source.
"""

from __future__ import annotations

import hashlib
import logging
import shutil

logger = logging.getLogger(__name__)

FATBIN = "cuda_kernels.fatbin"


def cuda_source(executable) -> str | None:
    """The CUDA C source of a built executable's device module, if it has one."""
    stack = list(executable.mod.imports)
    while stack:
        module = stack.pop()
        if module.kind == "cuda":
            return module.inspect_source("cuda")
        stack.extend(module.imports)
    return None


def precompile(executable, target) -> tuple[bytes, str] | None:
    """(fatbin, sha256 of the source) for the executable's CUDA kernels, or None without nvcc/kernels."""
    source = cuda_source(executable)
    if source is None or shutil.which("nvcc") is None:
        return None
    from tvm.support import nvcc

    with target:
        try:
            fatbin = nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc")
        except Exception as exc:  # noqa: BLE001 - nvcc failures: leave it to the GPU machine's NVRTC
            logger.warning("nvcc could not precompile the CUDA kernels (%s); they compile at load time",
                           str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
            return None
    return bytes(fatbin), hashlib.sha256(source.encode()).hexdigest()
