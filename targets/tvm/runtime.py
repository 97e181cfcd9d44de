"""Run a compiled artifact directory: ``load(DIR)`` returns a callable :class:`Runner`.

This module imports only the standard library, numpy and TVM's *runtime* (``tvm.runtime`` and its
Relax VM), so it also works where TVM's compiler library is absent: with ``TVM_USE_RUNTIME_LIB=1``
and only ``libtvm_runtime*.so`` installed (the CUDA benchmark ships it that way to a GPU machine).
It does not import graphopt's core either (which needs onnx); it can be loaded as a plain file.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from graphopt.errors import GraphoptError
except ImportError:  # loaded standalone (a file on a machine without graphopt's dependencies)
    GraphoptError = RuntimeError  # type: ignore[misc,assignment]

MANIFEST = "manifest.json"
FORMAT = "graphopt-tvm-artifact"
EXEC_MODES = ("compiled", "bytecode")  # how the Relax VM runs the model; see build.compile_model


class ArtifactError(GraphoptError):
    """A compiled artifact directory that cannot be read or run as asked."""


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of artifact directory ``path`` (checked to be one)."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder} is not a compiled artifact (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder / MANIFEST} cannot be read: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{folder / MANIFEST} is not a graphopt TVM manifest")
    return manifest


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Runner:
    """A loaded artifact: ``runner(x)`` / ``runner(input_ids=..., attention_mask=...)`` -> {output name: array}."""

    def __init__(self, path: str | os.PathLike, device_id: int = 0, threads: int | None = None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.inputs: list[dict] = self.manifest["inputs"]
        self.outputs: list[dict] = self.manifest["outputs"]
        kind = self.manifest["target"]["kind"]
        if kind == "cpu":
            self.threads = size_thread_pool(threads, self.manifest["target"]["tvm"].get("num-cores"))
        self.device = tvm.cuda(device_id) if kind == "cuda" else tvm.cpu(device_id)
        if kind == "cuda" and not self.device.exist:
            raise ArtifactError(f"{self.path} was compiled for CUDA and there is no CUDA GPU here")
        if kind == "cuda" and self.manifest.get("cuda_fatbin"):
            _serve_precompiled_kernels(self.path, self.manifest["cuda_fatbin"])
        lib = self.path / self.manifest["library"]
        try:
            self._vm = VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for bad libraries
            raise ArtifactError(f"cannot load {lib}: {str(exc).strip().splitlines()[-1]}") from None
        self._main = self._vm["main"]

    def __call__(self, *args: np.ndarray, **kwargs: np.ndarray) -> dict[str, np.ndarray]:
        if len(args) > len(self.inputs):
            raise ArtifactError(f"{len(args)} positional inputs given, the model takes {len(self.inputs)}")
        feeds = {spec["name"]: value for spec, value in zip(self.inputs, args, strict=False)}
        if both := sorted(set(feeds) & set(kwargs)):
            raise ArtifactError(f"inputs given twice: {both}")
        return self.run({**feeds, **kwargs})

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on ``feeds`` (checked against the manifest), outputs as numpy arrays by name."""
        args = self._device_args(feeds)
        try:
            result = self._main(*args)
            self.device.sync()
            values = list(result) if len(self.outputs) > 1 else [result]
            return {spec["name"]: _to_numpy(value, spec["dtype"])
                    for spec, value in zip(self.outputs, values, strict=True)}
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types (e.g. a negative output dim)
            raise ArtifactError(f"the compiled model failed to run: {str(exc).strip().splitlines()[-1]}") from None

    def prepared(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], None]:
        """A call that runs the model once on ``feeds``, copied to the device now: what timing loops call."""
        args = self._device_args(feeds)

        def call() -> None:
            self._main(*args)
            self.device.sync()

        return call

    def benchmark(self, feeds: Mapping[str, np.ndarray], repeat: int = 20, warmup: int = 3) -> list[float]:
        """Wall time (ms) of ``repeat`` runs after ``warmup`` runs, inputs already on the device."""
        call = self.prepared(feeds)
        times = []
        for i in range(warmup + repeat):
            start = time.perf_counter()
            call()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return times

    def profile(self, feeds: Mapping[str, np.ndarray], runs: int = 5) -> list[dict[str, Any]]:
        """Where the time goes: wall time per called function (fused TIR kernels, library calls) over
        ``runs`` runs, heaviest first, through the Relax VM's call instrument (0.27 has no VM profiler).
        The instrument is a Python callback per call: small kernels' times include its overhead.
        Only bytecode artifacts have it (native "compiled" VM code calls the kernels directly)."""
        if self.manifest.get("exec_mode", "bytecode") != "bytecode":
            raise ArtifactError(f"{self.path} runs the VM as native code, which has no per-call instrument",
                                hint="compile it again with --exec-mode bytecode (and --db to reuse its schedules)")
        args = self._device_args(feeds)
        self._main(*args)  # warm up before timing
        totals: dict[str, list[float]] = {}
        started: list[float] = []

        def instrument(func, symbol, before_run, ret_value, *call_args):
            if before_run:
                started.append(time.perf_counter())
            else:
                self.device.sync()
                name = "vm.builtin.*" if str(symbol).startswith("vm.builtin") else str(symbol)
                totals.setdefault(name, []).append((time.perf_counter() - started.pop()) * 1e3)
            return 0

        self._vm.set_instrument(instrument)
        try:
            for _ in range(runs):
                self._main(*args)
        finally:
            self._vm.set_instrument(None)
        whole = sum(sum(t) for t in totals.values()) or 1.0
        rows = [{"function": name, "calls_per_run": len(t) // runs, "ms_per_run": sum(t) / runs,
                 "share": sum(t) / whole} for name, t in totals.items()]
        return sorted(rows, key=lambda row: -row["ms_per_run"])

    def median_ms(self, feeds: Mapping[str, np.ndarray], repeat: int = 20) -> float:
        return statistics.median(self.benchmark(feeds, repeat))

    def _device_args(self, feeds: Mapping[str, np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(value, self.device) for value in check_feeds(self.inputs, feeds)]


def _to_numpy(value: Any, dtype: str) -> np.ndarray:
    """A VM result as numpy: a tensor, or the shape tuple Relax returns where an ONNX Shape is an output."""
    return value.numpy() if hasattr(value, "numpy") else np.array(tuple(value), dtype=dtype)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def size_thread_pool(threads: int | None, default: int | None = None) -> int:
    """Size TVM's CPU thread pool to ``threads``, else $TVM_NUM_THREADS, else ``default``, else every
    usable core, and return its size.

    TVM reads TVM_NUM_THREADS when it makes the pool (its first use) *and at every parallel launch*:
    there a value of 1, or when unset half the hardware threads (it assumes hyper-threading: one of
    this machine's two cores), runs the kernel serially on the calling thread. So the variable is set
    for the rest of the process; restoring it after making the pool ran MiniLM's FFN kernel on one
    thread (345 against 184 us). A pool made earlier in the process can only be narrowed.
    """
    import tvm

    if threads is not None and threads < 1:
        raise ArtifactError(f"threads must be at least 1, got {threads}")
    wanted = int(threads or os.environ.get("TVM_NUM_THREADS") or default or usable_cores())
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    os.environ["TVM_NUM_THREADS"] = str(wanted)
    if tvm.runtime.num_threads() != wanted:
        tvm.get_global_func("runtime.config_threadpool")(1, wanted)  # 1: TVM's kBig, i.e. any core
    if affinity is not None:  # a one-thread pool pins the calling thread to one core: onnxruntime would inherit it
        os.sched_setaffinity(0, affinity)
    return tvm.runtime.num_threads()


def check_feeds(specs: Sequence[Mapping[str, Any]], feeds: Mapping[str, Any]) -> list[np.ndarray]:
    """Feeds in input order, each checked for presence, dtype, rank, static dims and consistent symbols."""
    names = [s["name"] for s in specs]
    if missing := [n for n in names if n not in feeds]:
        raise ArtifactError(f"missing input(s) {missing}; the model takes {names}")
    if extra := sorted(set(feeds) - set(names)):
        raise ArtifactError(f"unknown input(s) {extra}; the model takes {names}")
    symbols: dict[str, tuple[int, str]] = {}
    ordered = []
    for spec in specs:
        name, value = spec["name"], np.asarray(feeds[spec["name"]])
        if value.dtype != np.dtype(spec["dtype"]):
            raise ArtifactError(f"input {name!r} has dtype {value.dtype}, the model takes {spec['dtype']}")
        shape = spec["shape"]
        if value.ndim != len(shape):
            raise ArtifactError(f"input {name!r} has shape {list(value.shape)}, the model takes {shape}")
        for axis, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise ArtifactError(f"input {name!r} has shape {list(value.shape)}, the model takes {shape}")
            if isinstance(want, str):
                seen = symbols.setdefault(want, (got, name))
                if seen[0] != got:
                    raise ArtifactError(f"dim {want!r} is {seen[0]} in input {seen[1]!r} but {got} in input "
                                        f"{name!r} (axis {axis})")
        ordered.append(np.require(value, requirements="C"))  # ascontiguousarray makes a 0-d array 1-d
    return ordered


def _serve_precompiled_kernels(folder: Path, entry: Mapping[str, str]) -> None:
    """Answer TVM's load-time CUDA compile hook with the artifact's fatbin for its exact source; any
    other source goes to the previous hook (TVM's NVRTC/nvcc one when ``tvm.support.nvcc`` is imported)."""
    import hashlib

    import tvm_ffi

    fatbin = (folder / entry["file"]).read_bytes()
    with contextlib.suppress(ImportError):  # registers TVM's own hook, which becomes the fallback
        import tvm.support.nvcc  # noqa: F401
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_cuda(code):
        if hashlib.sha256(str(code).encode()).hexdigest() == entry["source_sha256"]:
            return fatbin
        if previous is None:
            raise ArtifactError("CUDA source without a precompiled fatbin and no compiler hook (tvm.support.nvcc)")
        return previous(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def load(path: str | os.PathLike, device_id: int = 0, threads: int | None = None) -> Runner:
    """Load the artifact that ``graphopt compile`` wrote into directory ``path``.

    CPU artifacts run on ``threads`` threads, by default the ``num-cores`` they were compiled (and
    tuned) for; TVM has one thread pool per process, so the last load sizes it for all.
    """
    return Runner(path, device_id, threads)
