"""``graphopt`` command line: a thin layer over the Python API (one flag, one argument).

User errors (GraphoptError) print one message and exit 2; a verification
mismatch exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import GraphoptError
from .onnx_io import load, runnable, save
from .optimize import TARGET_RUNTIMES
from .passes.prune.cli import add_parser as add_prune_parser
from .passes.quant.cli import add_parser as add_quant_parser
from .pipeline import available_passes, default_pipeline
from .pipeline.registry import LEVELS
from .targets.tvm.cli import add_parser as add_tvm_parser

EXIT_MISMATCH = 1
EXIT_USER_ERROR = 2

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def step(text: str):
    """A spinner on stderr for a step that may take a while (only on a terminal)."""
    return err.status(text) if err.is_terminal else contextlib.nullcontext()


def parse_shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    """``name=1x3x224x224`` (input name or dim_param name) -> {"name": [1, 3, 224, 224]}."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise GraphoptError(f"bad --shape {item!r}", hint="write NAME=DIMxDIM..., e.g. input=1x3x224x224") from None
    return shapes


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


# -- inspect ---------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from .summary import summarize

    bindings = {k: v[0] for k, v in parse_shapes(args.shape).items() if len(v) == 1}
    with step("loading and inferring shapes"):
        summary = summarize(load(args.model), bindings)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    table = Table(title=os.path.basename(args.model), show_header=False)
    rows = [
        ("IR version", summary.ir_version),
        ("opsets", ", ".join(f"{k} {v}" for k, v in summary.opsets.items())),
        ("producer", summary.producer or "-"),
        ("nodes", f"{summary.nodes} (+{summary.nodes_in_subgraphs} in {summary.subgraphs} subgraphs)"),
        ("functions", summary.functions),
        ("params", f"{summary.params:,} in {summary.initializers} initializers ({_bytes(summary.param_bytes)})"),
        ("est. MACs", f"{summary.macs:,}" + (" (symbolic dims = 1)" if not bindings else "")),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    for kind, values in (("input", summary.inputs), ("output", summary.outputs)):
        for v in values:
            table.add_row(kind, f"{v.name}: {v.dtype} {v.shape if v.shape is not None else '(rank unknown)'}")
    out.print(table)
    ops = Table("op", "count", title="ops")
    for op, count in summary.ops.items():
        ops.add_row(op, str(count))
    out.print(ops)
    return 0


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# -- optimize --------------------------------------------------------------------------
def cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import optimize

    if os.path.exists(args.output) and os.path.realpath(args.output) == os.path.realpath(args.model):
        raise GraphoptError("the output path is the input file", hint="write the optimized model to a new path")
    shapes = parse_shapes(args.shape)
    inputs = _user_inputs(args)
    with step("loading"):
        model = load(args.model)
    start = time.perf_counter()
    with step("optimizing" + (" (verifying every pass)" if args.verify_each else "")):
        result = optimize(model, _split(args.passes), disable=_split(args.disable) or (),
                          level=args.level, target_runtime=args.target_runtime, verify_each=args.verify_each,
                          inputs=inputs, shapes=shapes, max_iterations=args.max_iterations)
    elapsed = time.perf_counter() - start
    explanations = _explain(model, args.explain) if args.explain else None
    verdict = None
    if args.verify:
        from .verify import verify_models

        with step("verifying against the original in onnxruntime"), \
                runnable(model, os.path.dirname(os.path.abspath(args.output))) as candidate:
            verdict = verify_models(args.model, candidate, inputs=inputs, shapes=shapes,
                                    rtol=args.rtol, atol=args.atol)
        if not verdict.ok:
            _print_verify(verdict, args.json)
            err.print("[red]error:[/] the optimized model does not match the original; nothing was written")
            return EXIT_MISMATCH
    with step(f"writing {args.output}"):
        save(model, args.output)
    if args.json:
        print(json.dumps({"output": args.output, "nodes_before": result.nodes_before,
                          "nodes_after": result.nodes_after, "seconds": elapsed,
                          "pipeline": result.pipeline.to_dict(),
                          "verify": verdict.to_dict() if verdict else None,
                          "explain": [vars(e) for e in explanations] if explanations is not None else None},
                         indent=2))
        return 0
    table = Table("pass", "runs", "changes", "time (ms)", title="passes")
    for name, stats in result.pipeline.stats.items():
        table.add_row(name, str(stats.runs), str(stats.changes), f"{stats.seconds * 1000:.1f}")
    out.print(table)
    out.print(f"nodes {result.nodes_before} -> {result.nodes_after} in {elapsed:.2f} s "
              f"({result.pipeline.iterations} iterations); wrote {args.output}")
    if verdict is not None:
        out.print("[green]verified:[/] outputs match the original in onnxruntime")
    if explanations is not None:
        table = Table("graph", "node", "verdict", title=f"rule {args.explain}: candidate anchors after optimizing")
        for e in explanations:
            table.add_row(e.graph, e.node, "matches" if e.matches else e.reason)
        out.print(table if explanations else f"rule {args.explain}: no candidate anchor node in the model")
    return 0


def _explain(model, rule_name: str):
    """Explanations for a rule of any registered rewrite pass."""
    from .rewrite import RewritePass

    for cls in available_passes().values():
        if issubclass(cls, RewritePass) and cls.rules.get(rule_name) is not None:
            return cls.rules.explain(model, rule_name)
    known = sorted(r.name for c in available_passes().values() if issubclass(c, RewritePass) for r in c.rules)
    raise GraphoptError(f"unknown rewrite rule {rule_name!r}", hint=f"known rules: {', '.join(known) or 'none'}")


def _user_inputs(args: argparse.Namespace):
    if not getattr(args, "inputs", None):
        return None
    from .verify import load_inputs

    return load_inputs(args.inputs)


# -- verify ----------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_models

    for path in (args.original, args.candidate):
        if not os.path.exists(path):
            raise GraphoptError(f"no such model file: {path}")
    if os.path.isdir(args.candidate):  # a compiled artifact (graphopt compile): run it in TVM
        from .targets.tvm.verify import verify_artifact

        with step("running the original in onnxruntime and the artifact in TVM"):
            report = verify_artifact(args.original, args.candidate, inputs=args.inputs,
                                     shapes=parse_shapes(args.shape), rtol=args.rtol, atol=args.atol)
        _print_verify(report, args.json)
        return 0 if report.ok else EXIT_MISMATCH
    with step("running both models in onnxruntime"):
        try:
            report = verify_models(args.original, args.candidate, inputs=_user_inputs(args),
                                   shapes=parse_shapes(args.shape), rtol=args.rtol, atol=args.atol)
        except GraphoptError:
            load(args.original)  # a broken file: graphopt's message names the nodes (a dangling edge's reader)
            raise
    if report.error and not report.outputs and os.path.isfile(args.candidate):
        load(args.candidate)  # the same for a candidate onnxruntime could not load; else the report says why
    _print_verify(report, args.json)
    return 0 if report.ok else EXIT_MISMATCH


def _print_verify(report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from .verify import render_report

        out.print(render_report(report))


# -- passes ----------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    default = set(default_pipeline())
    table = Table("pass", "level", "default", "description", title="available passes")
    for name, cls in available_passes().items():
        table.add_row(name, cls.level, "yes" if name in default else "", cls.description)
    out.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Optimize and verify ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what passes do")
    sub = parser.add_subparsers(dest="command", required=True)

    def shapes_and_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--shape", action="append", metavar="NAME=DIMS",
                       help="bind an input's (or a dim_param's) shape, e.g. input=1x3x224x224; repeatable")
        p.add_argument("--inputs", metavar="NPZ", help="real inputs (.npz keyed by input name) instead of random")
        p.add_argument("--rtol", type=float, help="elementwise relative tolerance (default: per dtype)")
        p.add_argument("--atol", type=float, help="elementwise absolute tolerance (default: per dtype)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("inspect", help="ops, sizes, shapes and estimated MACs of a model")
    p.add_argument("model")
    p.add_argument("--shape", action="append", metavar="DIM=N", help="bind a symbolic dim for MACs, e.g. batch=8")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("optimize", help="run a pass pipeline and write the optimized model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--passes", help="comma-separated pass names (default: every lossless pass)")
    p.add_argument("--disable", help="comma-separated pass names to skip")
    p.add_argument("--level", choices=LEVELS, default="fuse",
                   help="simplify: remove and fold redundancy only; fuse (default): also fuse operators")
    p.add_argument("--target-runtime", choices=TARGET_RUNTIMES, default="ort",
                   help="runtime whose fused operators to use (onnxruntime)")
    p.add_argument("--verify", action="store_true", help="compare with the original in onnxruntime before writing")
    p.add_argument("--verify-each", action="store_true",
                   help="check the IR and the outputs after every pass; names the pass that breaks them")
    p.add_argument("--max-iterations", type=int, default=10, help="fixed-point iteration cap")
    p.add_argument("--explain", metavar="RULE",
                   help="after optimizing, say for each candidate node why rewrite rule RULE does not match")
    shapes_and_inputs(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("verify", help="compare two models' outputs in onnxruntime (or a compiled artifact "
                                      "directory's in TVM); bisect on mismatch")
    p.add_argument("original")
    p.add_argument("candidate")
    shapes_and_inputs(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("passes", help="list available passes")
    p.set_defaults(func=cmd_passes)

    add_prune_parser(sub)
    add_quant_parser(sub)
    add_tvm_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except GraphoptError as error:
        report = getattr(error, "report", None)
        if report is not None:  # a pass changed the outputs under --verify-each: show where
            _print_verify(report, getattr(args, "json", False))
        err.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        return EXIT_MISMATCH if report is not None else EXIT_USER_ERROR
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
