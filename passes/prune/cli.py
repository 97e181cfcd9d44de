"""``graphopt prune``: the CLI over :func:`graphopt.passes.prune.prune` (one flag per PruneConfig field).

Wired into ``graphopt/cli.py`` with ``from graphopt.passes.prune.cli import add_parser`` and
``add_parser(sub)`` next to the other subcommands.
"""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console

from graphopt.errors import GraphoptError

from .importance import CRITERIA
from .renorm import BN_STATS


def cmd_prune(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.cli import parse_shapes

    from .api import PruneConfig, prune
    from .report import render

    if os.path.exists(args.output) and os.path.realpath(args.output) == os.path.realpath(args.model):
        raise GraphoptError("the output path is the input file", hint="write the pruned model to a new path")
    if args.round < 1:
        raise GraphoptError(f"--round must be at least 1, got {args.round}")
    protect = [p.strip() for p in (args.protect or "").split(",") if p.strip()]
    config = PruneConfig(ratio=args.ratio, flops=args.flops, criterion=args.criterion, round_to=args.round,
                         latency=args.latency, allocate=args.allocate,
                         protect=protect, calib=args.calib, calib_samples=args.calib_samples,
                         reconstruct=False if args.no_reconstruct else None, bn_stats=args.bn_stats, seed=args.seed,
                         shapes=parse_shapes(args.shape) or None)
    console = Console(stderr=True, highlight=False)
    status = console.status("pruning") if console.is_terminal else None
    model = graphopt.load(args.model)
    if status is not None:
        with status:
            report = prune(model, config)
    else:
        report = prune(model, config)
    graphopt.save(model, args.output)
    if args.json:
        print(json.dumps({"output": args.output, **report.to_dict()}, indent=2, default=float))
    else:
        out = Console(highlight=False)
        out.print(render(report))
        out.print(f"wrote {args.output}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to graphopt's argparse subparsers."""
    p = subparsers.add_parser("prune", help="structured channel pruning, refit by least squares on calibration data")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of channels removed from every prunable group")
    target.add_argument("--flops", type=float, help="fraction of the MACs to keep, e.g. 0.5 (uniform ratio found)")
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: .npz of stacked samples (leading sample axis) or a folder of .npz")
    p.add_argument("--calib-samples", type=int, default=256, help="use at most this many samples (default 256)")
    p.add_argument("--criterion", choices=CRITERIA, default="l1",
                   help="l1/l2 weight norm, bn gamma, activation energy or recon (output error after refit; "
                        "the last two need --calib)")
    p.add_argument("--round", type=int, default=1, metavar="N", help="round kept channel counts down to a multiple")
    p.add_argument("--latency", action="store_true",
                   help="channel counts for onnxruntime's CPU conv kernels: whole NCHWc blocks (--round, default 8 "
                        "on AVX2, 16 on AVX-512) and, above 4 blocks, whole sets of 4 blocks; where whole blocks "
                        "cannot meet --flops, whole residual branches go too")
    p.add_argument("--allocate", choices=("uniform", "latency"), default="uniform",
                   help="with --flops: one ratio for every group (uniform), or per-group --latency counts chosen by "
                        "timing pruned copies in onnxruntime on this machine, most time saved per MAC first, "
                        "removing a whole residual branch being one of the steps "
                        "(latency; takes ~10-30 s on a small CNN)")
    p.add_argument("--protect", metavar="NODE,...", help="node names whose output channels stay (besides the "
                                                         "first conv and the output layers)")
    p.add_argument("--no-reconstruct", action="store_true", help="do not refit layers on the calibration data")
    p.add_argument("--bn-stats", choices=BN_STATS, default="variance",
                   help="with --calib, re-estimate BatchNorm statistics (or the per-channel scale/shift of a BN "
                        "folded into its conv) so channel means and stds match the unpruned model's (default "
                        "variance; mean: shift only)")
    p.add_argument("--shape", action="append", metavar="NAME=DIMS",
                   help="input sizes for the shape probe and MAC counts: an input's shape (input=1x3x224x224) or a "
                        "symbolic dim's size (seq=128); repeatable (default: the first calibration sample's shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_prune)
    return p
