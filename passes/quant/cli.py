"""``graphopt quantize``: the CLI over :func:`graphopt.passes.quant.quantize` (one flag per QuantConfig field).

Wired into ``graphopt/cli.py`` with ``from .passes.quant.cli import add_parser`` and ``add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from graphopt.errors import GraphoptError

from .config import ACTIVATION_TYPES, METHODS, METRICS, MODES


def cmd_quantize(args: argparse.Namespace) -> int:
    import graphopt

    from .api import quantize
    from .config import QuantConfig
    from .report import render

    if os.path.exists(args.output) and os.path.realpath(args.output) == os.path.realpath(args.model):
        raise GraphoptError("the output path is the input file", hint="write the quantized model to a new path")
    if not os.path.isfile(args.model):
        raise GraphoptError(f"no such model file: {args.model}")
    op_types = [p.strip() for p in args.op_types.split(",") if p.strip()] if args.op_types else None
    exclude = [p.strip() for p in (args.exclude or "").split(",") if p.strip()]
    config = QuantConfig(mode=args.mode, activation_type=args.activation_type, per_channel=args.per_channel,
                         symmetric=args.symmetric, method=args.method, percentile=args.percentile,
                         max_error=args.max_error, metric=args.metric, latency_aware=not args.no_latency_aware,
                         latency_batch=args.latency_batch, smooth=not args.no_smooth,
                         op_types=op_types, nodes_to_exclude=exclude, calib_samples=args.calib_samples,
                         reduce_range=args.reduce_range, progress=Console(stderr=True).is_terminal)
    model, report = quantize(args.model, args.calib, config)
    graphopt.save(model, args.output)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report.to_json() + "\n")
    if args.json:
        print(report.to_json())
    else:
        out = Console(highlight=False)
        out.print(render(report))
        out.print(f"wrote {args.output}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to graphopt's argparse subparsers."""
    p = subparsers.add_parser("quantize", help="int8 quantization with calibration, an accuracy budget and a "
                                               "latency check")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", metavar="DATA", required=True,
                   help="calibration data: .npz of stacked samples (leading sample axis, keyed by input name) "
                        "or a folder of .npz files, one sample each")
    p.add_argument("--calib-samples", type=int, default=256, help="use at most this many samples (default 256)")
    p.add_argument("--mode", choices=MODES, default="static",
                   help="static QDQ (default), dynamic (MatMul/Gemm-heavy models: transformers) or weight_only")
    p.add_argument("--method", choices=METHODS, default="minmax", help="activation range calibration")
    p.add_argument("--percentile", type=float, default=99.999, help="for --method percentile")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="one weight scale per output channel (default) or per tensor")
    p.add_argument("--symmetric", action="store_true", help="symmetric activation ranges")
    p.add_argument("--activation-type", choices=ACTIVATION_TYPES, default="uint8",
                   help="uint8 (default; fast on every x86 CPU) or int8 (slow without VNNI)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                   help="7-bit weights (default: on for x86 CPUs without VNNI, whose int8 kernels saturate)")
    p.add_argument("--max-error", type=float, help="accuracy budget on the outputs vs fp32 (see --metric); the "
                                                   "most sensitive layers stay float until it is met")
    p.add_argument("--metric", choices=METRICS, default="cosine",
                   help="cosine: 1 - mean cosine similarity; rel_l2: relative L2 error")
    p.add_argument("--op-types", metavar="OP,...", help="op types to quantize (default: those that pay here)")
    p.add_argument("--exclude", metavar="NODE,...", help="node names to keep in float")
    p.add_argument("--no-latency-aware", action="store_true",
                   help="quantize every supported op even where int8 is slower here")
    p.add_argument("--latency-batch", type=int, metavar="N",
                   help="time the latency check at this batch size, the one the model will serve (default: one "
                        "calibration sample)")
    p.add_argument("--no-smooth", action="store_true",
                   help="do not move the outlier channels of MatMul inputs into the weights (SmoothQuant)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", metavar="FILE", help="also write the JSON report to FILE")
    p.set_defaults(func=cmd_quantize)
    return p
