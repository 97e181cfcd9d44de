"""``graphopt compile`` and ``graphopt run``: the CLI over :func:`compile_model` and :func:`load`.

Wired into ``graphopt/cli.py`` with ``add_parser(sub)``, like ``graphopt prune``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console

from graphopt.errors import GraphoptError

err = Console(stderr=True, highlight=False)


def cmd_compile(args: argparse.Namespace) -> int:
    from graphopt.cli import parse_shapes

    from .build import DEFAULT_DB, compile_model
    from .tune import RPCConfig

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise GraphoptError("--rpc-tracker and --rpc-key go together")
    if (args.rpc_tracker or args.trials is not None or args.tune_minutes is not None) and not args.tune:
        raise GraphoptError("--trials, --tune-minutes and --rpc-* only apply with --tune")
    if args.tune_minutes is not None and args.tune_minutes <= 0:
        raise GraphoptError(f"--tune-minutes must be positive, got {args.tune_minutes}")
    rpc = RPCConfig.parse(args.rpc_tracker, args.rpc_key, args.rpc_workers) if args.rpc_tracker else None
    trials = (args.trials if args.trials is not None else 256) if args.tune else 0
    if args.tune and trials < 1:
        raise GraphoptError(f"--trials must be at least 1, got {trials}")
    with _progress(trials) as on_progress:
        result = compile_model(args.model, args.output, target=args.target, arch=args.arch,
                               shapes=parse_shapes(args.shape), tune_trials=trials,
                               db=args.db or (DEFAULT_DB if args.tune else None), exec_mode=args.exec_mode,
                               rpc=rpc, num_cores=args.num_cores, on_progress=on_progress,
                               tune_time_limit_s=None if args.tune_minutes is None else 60 * args.tune_minutes,
                               verify=not args.no_verify)
    report = result.tuning
    if args.json:
        print(json.dumps({"output": str(result.path), "manifest": result.manifest,
                          "tuning": report.to_dict() if report else None}, indent=2))
        return 0
    out = Console(highlight=False)
    if report is not None and not args.tune:
        out.print(f"tuning: {len(report.reused)} of {report.tasks} tasks have schedules in {report.database}; "
                  "nothing tuned")
    elif report is not None and not report.tuned:
        out.print(f"tuning: all {report.tasks} tasks already in {report.database}; nothing tuned")
    elif report is not None:
        out.print(f"tuning: {len(report.tuned)} of {report.tasks} tasks tuned, {report.trials} trials measured "
                  f"({report.failed} failed) in {report.seconds:.0f} s{' (time limit)' if report.timed_out else ''}; "
                  f"database {report.database}")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    out.print(f"compiled for {describe_target(result.manifest)} ({stages}); wrote {result.path}")
    checked = result.manifest.get("verification")
    if checked is not None:
        out.print(f"verified: its {len(checked['outputs'])} output(s) match onnxruntime's on generated inputs"
                  if checked["checked"] else f"not verified: {checked['why']}")
    return 0


class _progress:
    """A rich progress bar over measured tuning trials on stderr (only when tuning, only on a terminal)."""

    def __init__(self, trials: int) -> None:
        self.trials = trials
        self.bar = None

    def __enter__(self):
        if not self.trials or not err.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("tuning {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=True)
        self.bar.start()
        task = self.bar.add_task("(importing TVM's tuner)", total=self.trials)

        def update(done: int, total: int, name: str) -> None:
            self.bar.update(task, completed=min(done, total), description=name)

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import load

    if args.repeat is not None and args.repeat < 1:
        raise GraphoptError(f"--repeat must be at least 1, got {args.repeat}")
    runner = load(args.artifact, threads=args.threads)
    feeds = _feeds(args.inputs, runner.inputs)
    outputs = runner.run(feeds)
    median = runner.median_ms(feeds, args.repeat) if args.repeat else None
    if args.output:
        _save_npz(args.output, outputs)
    if args.json:
        print(json.dumps({"median_ms": median, "repeat": args.repeat, "outputs": list(outputs),
                          "output": args.output}, indent=2))
        return 0
    out = Console(highlight=False)
    for name, value in outputs.items():
        out.print(f"{name}: {value.dtype} {list(value.shape)}")
    if median is not None:
        out.print(f"median latency {median:.3f} ms over {args.repeat} runs")
    if args.output:
        out.print(f"wrote {args.output}")
    return 0


def _feeds(path: str | None, specs: list[dict]) -> dict[str, np.ndarray]:
    if path is not None:
        from graphopt.verify import load_inputs

        return load_inputs(path)
    feeds = {}
    rng = np.random.default_rng(0)
    for spec in specs:  # symbolic dims are 1; integer inputs (ids, masks) 0, valid for any vocabulary
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        feeds[spec["name"]] = rng.random(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    return feeds


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    target = Path(path)
    if target.suffix != ".npz":
        raise GraphoptError(f"-o {path}: the outputs file must end in .npz")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def describe_target(manifest: dict) -> str:
    """'cpu (znver4, 2 cores)' / 'cuda (sm_90)' from an artifact manifest."""
    target = manifest["target"]["tvm"]
    detail = target.get("arch") or f"{target.get('mcpu', 'generic')}, {target.get('num-cores', '?')} cores"
    return f"{manifest['target']['kind']} ({detail})"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compile`` and ``run`` subcommands to graphopt's argparse subparsers."""
    from .runtime import EXEC_MODES
    from .target import TARGETS

    p = subparsers.add_parser("compile", help="compile a model with TVM for cpu or cuda into an artifact directory")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory (library + manifest)")
    p.add_argument("--target", choices=TARGETS, default="cpu")
    p.add_argument("--arch", help="CUDA architecture, e.g. sm_90 (default: the GPU's; compiling needs no GPU)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS",
                   help="fix an input's shape (input=1x3x224x224) or a symbolic dim (seq=128); repeatable. "
                        "Dims left open stay symbolic")
    p.add_argument("--tune", action="store_true", help="tune with MetaSchedule before building")
    p.add_argument("--trials", type=int, help="tuning trial budget over all tasks (default 256)")
    p.add_argument("--tune-minutes", type=float, metavar="MIN",
                   help="stop tuning after the first batch that ends past this wall time (keeps what was measured)")
    p.add_argument("--db", metavar="DIR", help="tuning database, reused across runs (default ~/.cache/graphopt/"
                                               "tvm-tuning); without --tune, apply its schedules and tune nothing")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on RPC servers registered with this tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="the servers' key at the tracker")
    p.add_argument("--rpc-workers", type=int, default=1, help="candidates measured in parallel over RPC")
    p.add_argument("--num-cores", type=int, help="CPU threads the compiled code uses (default: all usable)")
    p.add_argument("--exec-mode", choices=EXEC_MODES, default="compiled",
                   help="compiled: the Relax VM's bytecode as native code (faster); bytecode: keeps the VM's "
                        "call instrument, for Runner.profile")
    p.add_argument("--no-verify", action="store_true",
                   help="write the artifact without first comparing its outputs with onnxruntime's")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("run", help="run a compiled artifact directory on inputs")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--inputs", metavar="NPZ", help="inputs keyed by name (default: random floats, zero integers, "
                                                   "symbolic dims 1)")
    p.add_argument("-o", "--output", metavar="NPZ", help="write the outputs here")
    p.add_argument("--repeat", type=int, metavar="N", help="also time N runs and report the median latency")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: $TVM_NUM_THREADS, else the cores the artifact was compiled for)")
    p.add_argument("--json", action="store_true", help='print {"median_ms": ..., "outputs": [...]}')
    p.set_defaults(func=cmd_run)
