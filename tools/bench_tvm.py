"""TVM benchmark: onnxruntime vs TVM untuned vs TVM tuned at several trial budgets, batch 1.

    python -m tools.bench_tvm                                    # CPU, default models, budgets 64,256
    python -m tools.bench_tvm --models resnet_dynamo --trials 64,256,1000 --json out.json --markdown out.md
    python -m tools.bench_tvm --models mobilenet_dynamo --trials 600 --tune-minutes 20   # wall-time capped
    python -m tools.bench_tvm --device cuda --bundle .cache/tvm-cuda-bundle   # here: build the GPU bundle
    TVM_USE_RUNTIME_LIB=1 PYTHONPATH=.cache/tvm-cuda-bundle/site \\
        python tools/bench_tvm.py --device cuda --run-bundle .cache/tvm-cuda-bundle  # on the GPU machine

CPU, per model: compile wall time untuned and tuned (MetaSchedule, one fresh database per budget, so
every budget is tuned from scratch), every artifact checked against onnxruntime on the original model
(graphopt's fp32 rule: rtol 1e-4, atol 1e-5, float-noise bound), then latency of onnxruntime
(ORT_ENABLE_ALL, 2 intra-op threads, no spinning) and each artifact interleaved (A B C, B C A, ...:
``--rounds`` rounds of ``--repeat`` runs; ms = median of the round medians, x ORT = median of the
per-round ratios, so a load change between rounds affects both sides of a ratio; load averages are
recorded). GFLOP/s = 2 x MACs (graphopt's
summary) / latency, as a fraction of this machine's peak measured in the same run (numpy float32
2048^3 matmul, best of the interleaved rounds). For the best tuned artifact the table of per-kernel
time (Relax VM call instrument, on a bytecode-mode build of the same schedules) says where the time goes.

CUDA: this machine has no GPU. ``--bundle`` compiles each model here for ``--arch`` (sm_90) into an
artifact whose CUDA source is JIT-compiled by NVRTC when loaded, with the inputs and onnxruntime's
reference outputs, plus TVM's runtime only (no compiler library) and tvm-ffi for the GPU machine's
Python (``--python 3.12``, fetched with pip download). ``--run-bundle`` then runs there with numpy,
onnxruntime and that runtime only: TVM vs onnxruntime's CUDAExecutionProvider when it is available
(else onnxruntime CPU, said in the output; there is no other GPU baseline for an ONNX file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script (the GPU side): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench.pairing import paired_ratio

DEFAULT_MODELS = ("digits_cnn_dynamo", "resnet_dynamo", "mobilenet_dynamo", "bert_dynamo", "minilm_dynamo")
BUNDLE_MODELS = ("digits_cnn_dynamo", "resnet_dynamo", "mobilenet_dynamo", "bert_dynamo")  # small files
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ timing
BLAS_SPIN_S = 0.5  # longer than OpenBLAS's busy-wait after a call (its thread timeout, ~0.1 s)


def peak_gflops(size: int = 2048, runs: int = 3) -> float:
    """Best of ``runs`` float32 matmuls: on a shared machine one timing can land in another job's burst."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    a @ a
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def ort_session(model: str | bytes, providers: list[str], threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=providers)


def median_ms(fn, repeat: int, min_seconds: float = 0.1) -> float:
    """Median of at least ``repeat`` runs, and of as many as fit in ``min_seconds``: on this shared
    machine the speed swings within tens of milliseconds, and 20 runs of a 0.3 ms model sample one swing."""
    times: list[float] = []
    stop = time.perf_counter() + min_seconds
    while len(times) < repeat or time.perf_counter() < stop:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved(variants: dict[str, Any], rounds: int, repeat: int, with_peak: bool = True) -> dict[str, list[float]]:
    """Each variant's per-round median (ms), variants run in turn within a round (order rotated every
    round, so none always follows the same neighbour); ``peak`` GFLOP/s before and after the rounds.

    Not between rounds: numpy's BLAS threads busy-wait for a while after a matmul, and the variant
    that ran next lost a core to them (TVM's MobileNet read 0.167 ms in those rounds, 0.093 in the others).
    """
    peaks = []
    if with_peak:
        peaks.append(peak_gflops())
        time.sleep(BLAS_SPIN_S)
    for fn in variants.values():
        fn()  # warm up
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(median_ms(variants[name], repeat))
    if with_peak:
        samples["peak_gflops"] = [*peaks, peak_gflops()]
    return samples


def paired(samples: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float]]:
    """name -> (median ms, median over rounds of ms / baseline's ms in the same round): load that
    changes between rounds affects both sides of each ratio alike."""
    return {name: (statistics.median(s), paired_ratio(s, samples[baseline]))
            for name, s in samples.items() if name != "peak_gflops"}


def close(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, float]:
    """graphopt's fp32 rule without importing graphopt (the GPU side has no onnx): elementwise
    rtol 1e-4 / atol 1e-5, or error within 2**10 eps of the output's RMS. Returns (ok, max err / rms)."""
    ok, worst = True, 0.0
    for name, r in ref.items():
        g = got[name].astype(np.float64)
        r = r.astype(np.float64)
        err = np.abs(g - r)
        rms = float(np.sqrt(np.mean(r * r))) or 1.0
        worst = max(worst, float(err.max()) / rms)
        ok &= bool(np.all(err <= 1e-5 + 1e-4 * np.abs(r)) or err.max() <= 2**10 * np.finfo(np.float32).eps * rms)
    return ok, worst


# ------------------------------------------------------------------------------------------ CPU mode
def bench_cpu_model(name: str, budgets: list[int], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Compile (and tune) every variant, check it against onnxruntime, then time all of them interleaved."""
    from graphopt.targets.tvm import compile_model, load
    from graphopt.verify import run_model
    from tools.zoo import MODELS, build, make_inputs

    path = str(build(name))
    feeds = make_inputs(MODELS[name])
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    macs = _macs(path, shapes)
    reference = run_model(path, feeds)
    row: dict[str, Any] = {"model": name, "shapes": shapes, "macs": macs, "variants": {}}
    runners, dbs = {}, {}
    for trials in [*([] if args.no_untuned else [0]), *budgets]:
        label = "tvm_untuned" if trials == 0 else f"tvm_tuned_{trials}"
        dbs[label] = workdir / name / f"db_{trials}" if trials else None
        start = time.perf_counter()
        result = compile_model(path, workdir / name / label, shapes=shapes, tune_trials=trials, db=dbs[label],
                               tune_time_limit_s=60 * args.tune_minutes if args.tune_minutes else None)
        runner = load(result.path)
        ok, err = close(reference, runner.run(feeds))
        row["variants"][label] = {"compile_s": time.perf_counter() - start, "matches_ort": ok, "err_over_rms": err,
                                  "tune_s": result.seconds.get("tune"),
                                  "trials_measured": result.tuning.trials if result.tuning else None,
                                  "tasks": result.tuning.tasks if result.tuning else None,
                                  "time_limited": result.tuning.timed_out if result.tuning else None,
                                  "loadavg_after": os.getloadavg()}
        runners[label] = runner
    session = ort_session(path, ["CPUExecutionProvider"])
    fns = {"ort": lambda: session.run(None, feeds)}
    fns.update({label: r.prepared(feeds) for label, r in runners.items()})
    load_before = os.getloadavg()
    samples = interleaved(fns, args.rounds, args.repeat)
    row["loadavg_timing"] = [load_before, os.getloadavg()]
    row["peak_gflops"] = max(samples["peak_gflops"])
    row["rounds_ms"] = {k: v for k, v in samples.items() if k != "peak_gflops"}  # per round, to check the ratio
    timing = paired(samples, "ort")
    row["ort_ms"] = timing.pop("ort")[0]
    for label, (ms, ratio) in timing.items():
        v = row["variants"][label]
        v["ms"], v["vs_ort"] = ms, ratio
        v["gflops"] = 2 * macs / ms / 1e6 if macs else None
        v["peak_fraction"] = v["gflops"] / row["peak_gflops"] if macs else None
    row["ort_peak_fraction"] = 2 * macs / row["ort_ms"] / 1e6 / row["peak_gflops"] if macs else None
    best = min((label for label in timing if label != "tvm_untuned"), key=lambda k: timing[k][0],
               default="tvm_untuned")
    # The timed artifacts run the VM as native code; the same schedules in bytecode mode can be profiled.
    profiled = compile_model(path, workdir / name / f"{best}_bytecode", shapes=shapes, exec_mode="bytecode",
                             db=dbs[best])
    row["profile"] = {"variant": best, "kernels": load(profiled.path).profile(feeds)[: args.profile_top]}
    return row


def _macs(path: str, shapes: dict[str, list[int]]) -> int | None:
    """MACs at the inputs' ``shapes``: each symbolic input dim bound by name, which also binds it
    inside the graph (binding the inputs' types alone left inner values at 'seq' = 1: MiniLM read
    16x too few MACs)."""
    import graphopt
    from graphopt.summary import summarize

    model = graphopt.load(path)
    dims = {dim: size for value in model.graph.inputs if value.name in shapes and value.type.shape
            for dim, size in zip(value.type.shape, shapes[value.name], strict=True) if isinstance(dim, str)}
    return summarize(model, dims).macs or None


def cpu_markdown(rows: list[dict[str, Any]]) -> str:
    from tools.bench.markdown import table

    lines = ["## TVM vs onnxruntime, CPU, batch 1", ""]
    body = []
    for row in rows:
        body.append([row["model"], "onnxruntime", f"{row['ort_ms']:.3f}", "1.00", _pct(row["ort_peak_fraction"]),
                     "-", "-", "-", "yes"])
        for label, v in row["variants"].items():
            body.append([row["model"], label, f"{v['ms']:.3f}", f"{v['vs_ort']:.2f}", _pct(v["peak_fraction"]),
                         f"{v['compile_s']:.0f}", v["trials_measured"] if v["trials_measured"] is not None else "-",
                         f"{v['tune_s']:.0f}" if v["tune_s"] else "-", "yes" if v["matches_ort"] else "NO"])
    lines.append(table(["model", "variant", "ms", "x ORT (paired)", "% peak", "compile s", "trials", "tune s",
                        "matches ORT"], body, align_right_from=2))
    lines.append("")
    lines.append(f"peak (numpy fp32 2048^3 matmul, same run): {rows[0]['peak_gflops']:.0f} GFLOP/s" if rows else "")
    lines.append("x ORT: median over rounds of the variant's ms / onnxruntime's ms in the same round.")
    for row in rows:
        load = row["loadavg_timing"]
        lines.append(f"{row['model']}: load average (1 min) {load[0][0]:.1f} before / {load[1][0]:.1f} after timing; "
                     + ", ".join(f"{label} tuning ended at load {v['loadavg_after'][0]:.1f}"
                                 + (" (time limit hit)" if v["time_limited"] else "")
                                 for label, v in row["variants"].items() if v["tune_s"]))
    for row in rows:
        lines += ["", f"### where the time goes: {row['model']} ({row['profile']['variant']})", ""]
        lines.append(table(["function", "calls/run", "ms/run", "share"],
                           [[k["function"], k["calls_per_run"], f"{k['ms_per_run']:.3f}", _pct(k["share"])]
                            for k in row["profile"]["kernels"]]))
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


# ----------------------------------------------------------------------------------------- CUDA mode
def make_bundle(out: Path, models: list[str], arch: str, python: str) -> None:
    """Artifacts compiled here for the GPU, their inputs and references, and a runtime-only TVM."""
    from graphopt.targets.tvm import compile_model
    from graphopt.verify import run_model
    from tools.zoo import MODELS, build, make_inputs

    if out.exists():
        shutil.rmtree(out)
    (out / "models").mkdir(parents=True)
    for name in models:
        path = str(build(name))
        feeds = make_inputs(MODELS[name])
        compile_model(path, out / "models" / name, target="cuda", arch=arch,
                      shapes={k: list(v.shape) for k, v in feeds.items()})
        np.savez(out / "models" / name / "inputs.npz", **feeds)
        np.savez(out / "models" / name / "reference.npz", **run_model(path, feeds))
        shutil.copy(path, out / "models" / name / "model.onnx")
    _runtime_site(out / "site", python)
    shutil.copy(ROOT / "targets" / "tvm" / "runtime.py", out / "graphopt_tvm_runtime.py")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle {out}: {size / 2**20:.1f} MiB")


def _runtime_site(site: Path, python: str) -> None:
    """tvm (Python files + runtime libraries, no 250 MB compiler library) and tvm-ffi for ``python``."""
    import tvm

    source = Path(tvm.__file__).parent
    skip = shutil.ignore_patterns("__pycache__", "3rdparty", "include", "src", "web", "libtvm_compiler.so")
    shutil.copytree(source, site / "tvm", ignore=skip)
    with tempfile.TemporaryDirectory() as tmp:
        from importlib.metadata import version

        subprocess.run([sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version('apache-tvm-ffi')}",
                        "--python-version", python, "--only-binary=:all:", "--no-deps",
                        "--platform", "manylinux_2_28_x86_64", "-d", tmp, "-q"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        subprocess.run([sys.executable, "-m", "zipfile", "-e", str(wheel), str(site)], check=True)
    for junk in ("include", "src", "3rdparty", "cython", "lib/libtvm_ffi_testing.so"):
        shutil.rmtree(site / "tvm_ffi" / junk, ignore_errors=True) if not junk.endswith(".so") else \
            (site / "tvm_ffi" / junk).unlink(missing_ok=True)


def run_bundle(bundle: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """On the GPU machine: TVM (CUDA) vs onnxruntime (CUDA provider if present) on every bundled model."""
    import onnxruntime as ort

    spec = importlib.util.spec_from_file_location("graphopt_tvm_runtime", bundle / "graphopt_tvm_runtime.py")
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    try:
        import tvm.support.nvcc  # noqa: F401 - registers the NVRTC callback that compiles the CUDA source at load
    except ImportError as exc:
        print(f"note: tvm.support.nvcc not importable ({exc}); CUDA source cannot be JIT-compiled")
    cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    baseline = "onnxruntime CUDAExecutionProvider" if cuda_ort else "onnxruntime CPU (no CUDA provider installed)"
    print(f"baseline: {baseline}")
    rows = []
    for folder in sorted((bundle / "models").iterdir()):
        feeds = dict(np.load(folder / "inputs.npz"))
        reference = dict(np.load(folder / "reference.npz"))
        start = time.perf_counter()
        runner = runtime.load(folder)
        load_s = time.perf_counter() - start
        ok, err = close(reference, runner.run(feeds))
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ort else ["CPUExecutionProvider"]
        session = ort_session(str(folder / "model.onnx"), providers)
        ort_ok, _ = close(reference, dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds),
                                              strict=True)))
        timing = paired(interleaved({"ort": lambda s=session, f=feeds: s.run(None, f), "tvm": runner.prepared(feeds)},
                                    args.rounds, args.repeat, with_peak=False), "ort")
        rows.append({"model": folder.name, "baseline": baseline, "ort_ms": timing["ort"][0], "tvm_ms": timing["tvm"][0],
                     "vs_ort": timing["tvm"][1], "tvm_matches_ort": ok, "err_over_rms": err,
                     "ort_matches_reference": ort_ok, "load_and_jit_s": load_s})
        print(json.dumps(rows[-1]))
    return rows


def cuda_markdown(rows: list[dict[str, Any]]) -> str:
    header = ("| model | baseline | baseline ms | TVM ms | x baseline | TVM matches | load+JIT s |\n"
              "|---|---|--:|--:|--:|---|--:|")
    body = [f"| {r['model']} | {r['baseline']} | {r['ort_ms']:.3f} | {r['tvm_ms']:.3f} | {r['vs_ort']:.2f} | "
            f"{'yes' if r['tvm_matches_ort'] else 'NO'} ({r['err_over_rms']:.1e}) | {r['load_and_jit_s']:.1f} |"
            for r in rows]
    return "## TVM (CUDA, untuned dlight schedules) vs onnxruntime, batch 1\n\n" + "\n".join([header, *body]) + "\n"


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", help="comma-separated zoo names")
    parser.add_argument("--trials", default="64,256", help="tuning budgets (comma-separated), e.g. 64,256,1000")
    parser.add_argument("--no-untuned", action="store_true",
                        help="skip the untuned build (naive loops: seconds per run on ResNet-50)")
    parser.add_argument("--tune-minutes", type=float, help="wall-time limit of each tuning run (trials are the cap)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--repeat", type=int, default=20, help="runs per round, at least (and >= 0.1 s of them)")
    parser.add_argument("--profile-top", type=int, default=8, help="kernels listed per model")
    parser.add_argument("--workdir", help="artifacts and tuning databases (default: a temporary folder)")
    parser.add_argument("--bundle", metavar="DIR", help="cuda: compile here and write the GPU bundle to DIR")
    parser.add_argument("--run-bundle", metavar="DIR", help="cuda: run a bundle (on the GPU machine)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version (for tvm-ffi)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if args.bundle:
            models = args.models.split(",") if args.models else list(BUNDLE_MODELS)
            make_bundle(Path(args.bundle), models, args.arch, args.python)
            return 0
        if not args.run_bundle:
            parser.error("--device cuda needs --bundle DIR (here) or --run-bundle DIR (on the GPU machine)")
        rows = run_bundle(Path(args.run_bundle), args)
        text = cuda_markdown(rows)
    else:
        budgets = [int(t) for t in args.trials.split(",") if t.strip()]
        models = args.models.split(",") if args.models else list(DEFAULT_MODELS)
        with tempfile.TemporaryDirectory(prefix="bench_tvm-") as tmp:
            workdir = Path(args.workdir or tmp)
            rows = []
            for name in models:
                rows.append(bench_cpu_model(name, budgets, args, workdir))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}, default=str), flush=True)
        text = cpu_markdown(rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(ROOT))  # run as a file (the GPU machine): tools.* importable when needed
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
