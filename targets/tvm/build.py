"""``compile_model``: an ONNX model -> a compiled artifact directory (library + manifest).

Pipeline: :func:`frontend.prepare` (ops checked, shapes bound, simplified) -> Relax import ->
legalize + fuse into TIR tasks -> optional MetaSchedule tuning (best schedules applied from the
database) -> ``tvm.compile`` (the CUDA pipeline adds dlight's default GPU schedules) ->
``export_library``. The directory is written next to its final place and renamed into it, so an
existing artifact is either replaced whole or left as it was.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError
from graphopt.ir import Model
from graphopt.onnx_io import ModelLike, to_bytes, to_proto

from .cuda import FATBIN, precompile
from .frontend import prepare, relax_output_shapes, signature, to_relax
from .runtime import EXEC_MODES, FORMAT, MANIFEST, is_artifact
from .target import last_level_cache_bytes, make_target
from .tune import RPCConfig, SearchConfig, TuningReport, apply_database, tune

logger = logging.getLogger(__name__)

LIBRARY = "model.so"
DEFAULT_DB = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphopt" / "tvm-tuning"


@dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    tuning: TuningReport | None = None


def compile_model(
    model: Model | ModelLike,
    output: str | os.PathLike,
    *,
    target: str = "cpu",
    arch: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    tune_trials: int = 0,
    db: str | os.PathLike | None = None,
    rpc: RPCConfig | None = None,
    num_cores: int | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    tune_time_limit_s: float | None = None,
    exec_mode: str = "compiled",
    search: SearchConfig | None = None,
    verify: bool = True,
) -> CompileResult:
    """Compile ``model`` for ``target`` ("cpu" or "cuda") into artifact directory ``output``.

    ``shapes`` binds inputs (``{"images": [1, 3, 64, 64]}``) or symbolic dims (``{"seq": [16]}``);
    other dims stay symbolic. ``tune_trials > 0`` tunes with MetaSchedule first (database ``db``,
    reused across runs; measurement over ``rpc`` when given; at most ``tune_time_limit_s`` of tuning).
    ``db`` without tuning applies the schedules that database already has and tunes nothing.
    ``exec_mode`` "compiled" turns the Relax VM's bytecode into native code (the dispatch of its
    75-435 builtin and kernel calls per inference costs the small zoo models 4-8 %); "bytecode" keeps
    the VM's call instrument, which :meth:`Runner.profile` times each call with. ``search`` sets the
    MetaSchedule search (default: :class:`SearchConfig`, timing with flushed caches when the weights
    exceed this CPU's last-level cache, see :func:`weights_exceed`).
    ``verify`` runs the artifact and onnxruntime (the model as given) on the same generated inputs before
    the directory is put in place, and raises instead of writing it when an output differs (TVM's import
    of some ops computes something else, e.g. NonMaxSuppression); the result is the manifest's
    ``verification``. A CUDA artifact is verified only where there is a GPU.
    """
    if exec_mode not in EXEC_MODES:
        raise GraphoptError(f"unknown exec mode {exec_mode!r}", hint=f"use one of {', '.join(EXEC_MODES)}")
    out = Path(output)
    source, sha = _source(model)
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise GraphoptError("the output path is the input file", hint="write the artifact to a new directory")
    if out.exists() and not (out.is_dir() and (is_artifact(out) or not any(out.iterdir()))):
        raise GraphoptError(f"{out} exists and is not a compiled artifact; not overwriting it",
                            hint="choose a new directory (an existing artifact directory is replaced)")
    tvm_target = make_target(target, arch, num_cores)
    if tune_trials and target == "cuda" and rpc is None:
        import tvm

        if not tvm.cuda(0).exist:
            raise GraphoptError("tuning for CUDA measures on a GPU, and there is none here",
                                hint="add --rpc-tracker/--rpc-key to measure on a GPU machine, or drop --tune")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    proto = prepare(model, shapes)
    inputs, outputs = signature(proto)
    mod = to_relax(proto)
    for spec, shape in zip(outputs, relax_output_shapes(mod), strict=False):
        spec.shape = shape if shape is not None else spec.shape
    seconds["import"] = time.perf_counter() - clock
    report = None
    db_dir = Path(db) if db is not None else DEFAULT_DB
    if tune_trials or db is not None:
        symbolic = sorted({d for s in inputs for d in s.shape if isinstance(d, str)})
        if symbolic:
            raise GraphoptError(f"tuned schedules need static shapes; symbolic dims left: {', '.join(symbolic)}",
                                hint="bind them with --shape NAME=N (compile without --tune/--db keeps them dynamic)")
        clock = time.perf_counter()
        mod = lower_to_tasks(mod, tvm_target, nhwc=not _grouped_convs(proto))
        if search is None:
            search = SearchConfig(cache_flush=target == "cpu" and weights_exceed(proto, last_level_cache_bytes()))
        report = tune(mod, tvm_target, db_dir, tune_trials, rpc=rpc, on_progress=on_progress,
                      time_limit_s=tune_time_limit_s, search=search)
        mod = prepack_weights(apply_database(mod, tvm_target, db_dir), tvm_target)
        seconds["tune"] = time.perf_counter() - clock
    clock = time.perf_counter()
    executable = _compile(mod, tvm_target, exec_mode)
    kernels = precompile(executable, tvm_target) if target == "cuda" else None
    seconds["build"] = time.perf_counter() - clock
    manifest = {
        "format": FORMAT,
        "version": 1,
        "library": LIBRARY,
        "target": {"kind": target, "tvm": json.loads(str(tvm_target))},
        "exec_mode": exec_mode,
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "source_model": {"path": str(source) if source else None, "sha256": sha},
        "versions": _versions(),
        "tuning": None if report is None else {"database": str(db_dir.resolve()), "digest": report.digest,
                                               "tasks": report.tasks, "tuned_now": len(report.tuned),
                                               "cache_flush": search.cache_flush,
                                               "trials_now": report.trials},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "cuda_fatbin": None if kernels is None else {"file": FATBIN, "source_sha256": kernels[1]},
    }
    check = None
    if verify:
        original = to_proto(model) if isinstance(model, Model) else model  # (its file may predate edits)
        check = functools.partial(_check_outputs, original, proto, target)
    _write_artifact(out, executable, manifest, {FATBIN: kernels[0]} if kernels else {}, check)
    return CompileResult(out, manifest, seconds, report)


def lower_to_tasks(mod, target, nhwc: bool = False):
    """Legalize and fuse: the Relax module whose TIR functions are MetaSchedule's tasks.

    With ``nhwc`` (CPU only) the convolutions are converted to NHWC first. On CPU the weights
    (constants here) are marked layout-free, so MetaSchedule's RewriteLayout may store them in the
    blocked order its tiling reads;
    :func:`prepack_weights` then does that repacking once, at compile time.
    """
    import tvm
    from tvm import relax

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              relax.get_pipeline("zero")]
    if target.kind.name == "llvm":
        if nhwc:
            passes.insert(0, relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}))
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def weights_exceed(proto, cache_bytes: int | None) -> bool:
    """Whether the model's initializers outgrow a cache of ``cache_bytes``: then every inference streams
    its weights from memory, and tuning should time kernels that way. MiniLM (90 MB of weights, 32 MB
    L3) tuned with flushed caches ran 17 % faster than with the same budget timed warm (paired)."""
    if not cache_bytes:
        return False
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer) > cache_bytes


def _grouped_convs(proto) -> bool:
    """Tuned in NHWC, the small ResNet ran 10 % faster than in NCHW (same budget, paired in one run);
    the depthwise MobileNet ran 2.6x slower, so models with grouped convolutions stay NCHW."""
    return any(node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
               for node in proto.graph.node)


def prepack_weights(mod, target):
    """Move the tuned kernels' weight-layout rewrites out of the kernels and fold them on the constants."""
    import tvm
    from tvm import relax

    if target.kind.name != "llvm":
        return mod
    with target:
        return tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                         relax.transform.FoldConstant()])(mod)


def _compile(mod, target, exec_mode: str):
    from tvm import relax

    try:
        return relax.build(mod, target=target, exec_mode=exec_mode)
    except Exception as exc:  # noqa: BLE001 - TVM's lowering raises TVMError/InternalError subclasses
        detail = (str(exc).strip().splitlines() or [f"{type(exc).__name__} with no message"])[-1]
        raise GraphoptError(f"TVM failed to compile the model for {target.kind.name}: {detail}") from None


def _check_outputs(original: ModelLike, proto: onnx.ModelProto, target: str, folder: Path) -> dict[str, Any]:
    """Compare the artifact in ``folder`` with onnxruntime running ``original`` on inputs generated for the
    compiled model (``proto``: shapes bound); raise on a difference, else say what was checked."""
    from graphopt.verify import VerificationError, generate_inputs

    from .verify import verify_artifact

    if target == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            return {"checked": False, "why": "no CUDA GPU here to run it on"}
    try:
        report = verify_artifact(original, folder, inputs=generate_inputs(proto, seed=0))
    except VerificationError as exc:  # generated inputs the original does not run on: nothing to compare with
        logger.warning("the compiled model was not verified: %s", exc)
        return {"checked": False, "why": str(exc)}
    if report.error is not None:
        raise GraphoptError(f"{report.error} (on generated inputs the original runs on in onnxruntime)",
                            hint="`graphopt compile --no-verify` writes it anyway")
    if not report.ok:
        bad = "; ".join(f"{d.name}: {d.verdict}" + (f" ({d.detail})" if d.detail else "")
                        for d in report.outputs if not d.ok)
        raise GraphoptError(f"the compiled model's outputs differ from onnxruntime's on generated inputs: {bad}",
                            hint="TVM imports or compiles an op of this model differently; `graphopt compile "
                                 "--no-verify` writes it anyway, `graphopt verify MODEL DIR` compares again")
    return {"checked": True, "inputs": report.input_shapes, "outputs": {d.name: d.verdict for d in report.outputs}}


def _write_artifact(out: Path, executable, manifest: dict[str, Any], extra: dict[str, bytes],
                    check: Callable[[Path], dict[str, Any]] | None = None) -> None:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        executable.export_library(str(staging / LIBRARY))
        for name, data in extra.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check is not None:  # before the rename: a wrong artifact never takes the output's place
            manifest["verification"] = check(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.old-"))
            os.rename(out, old / "artifact")
        os.rename(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _source(model: Model | ModelLike) -> tuple[str | None, str]:
    """The model's file (if it came from one) and the sha256 of its bytes."""
    path = model.source_path if isinstance(model, Model) else (
        os.fspath(model) if isinstance(model, str | os.PathLike) else None)
    if isinstance(model, Model) and path is None:
        return None, hashlib.sha256(to_bytes(model)).hexdigest()
    if path is not None:
        if not os.path.isfile(path):
            raise GraphoptError(f"no such model file: {path}")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return path, digest.hexdigest()
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return None, hashlib.sha256(data).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import graphopt

    return {"graphopt": graphopt.__version__, "tvm": version("apache-tvm"), "tvm_ffi": version("apache-tvm-ffi")}
