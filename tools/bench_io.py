"""Load+save wall time and peak memory: graphopt vs plain onnx.load/onnx.save, same run.

Each measurement is a fresh process (so peak RSS is its own), the variants are
interleaved (A B A B ...) against drift on a shared machine, and the report
gives medians and the ratios the core issue targets:

    time(graphopt) / time(onnx) <= 1.5
    peak RSS above the interpreter baseline <= 1.3 x the model's size on disk

    python tools/bench_io.py                      # the largest zoo model (BERT-base, built if needed)
    python tools/bench_io.py --model path.onnx --repeat 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, resource, sys, time
variant, src, dst = sys.argv[1:4]
import onnx
import graphopt
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after imports
start = time.perf_counter()
if variant == "onnx":
    onnx.save(onnx.load(src), dst)
else:
    graphopt.save(graphopt.load(src), dst)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "baseline_kib": baseline, "peak_kib": peak}))
"""

VARIANTS = ("onnx", "graphopt")


def measure(variant: str, src: str, workdir: str) -> dict:
    dst = os.path.join(workdir, f"{variant}.onnx")
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, src, dst], capture_output=True, text=True,
                          check=True)
    os.unlink(dst)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def default_model() -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.zoo import build

    return str(build("bert_base_torchscript"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ONNX file (default: the zoo's BERT-base)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = args.model or default_model()
    size = os.path.getsize(model)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(model))) as workdir:
        for _ in range(args.repeat):
            for variant in VARIANTS:
                runs[variant].append(measure(variant, model, workdir))
    summary = {"model": model, "size_mb": size / 1e6, "repeat": args.repeat}
    for variant in VARIANTS:
        summary[variant] = {
            "seconds_median": statistics.median(r["seconds"] for r in runs[variant]),
            "peak_above_baseline_mb_median": statistics.median(
                (r["peak_kib"] - r["baseline_kib"]) * 1024 / 1e6 for r in runs[variant]),
        }
    summary["time_ratio"] = summary["graphopt"]["seconds_median"] / summary["onnx"]["seconds_median"]
    summary["graphopt_rss_over_size"] = summary["graphopt"]["peak_above_baseline_mb_median"] / summary["size_mb"]
    summary["onnx_rss_over_size"] = summary["onnx"]["peak_above_baseline_mb_median"] / summary["size_mb"]
    print(f"model {model} ({summary['size_mb']:.1f} MB), {args.repeat} interleaved runs each, medians\n")
    print("| variant | load+save (s) | peak RSS above baseline (MB) | RSS / file size |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        s = summary[variant]
        print(f"| {variant} | {s['seconds_median']:.3f} | {s['peak_above_baseline_mb_median']:.1f} | "
              f"{s['peak_above_baseline_mb_median'] / summary['size_mb']:.2f} |")
    print(f"\ntime ratio graphopt/onnx = {summary['time_ratio']:.2f} (target <= 1.5); "
          f"graphopt RSS/size = {summary['graphopt_rss_over_size']:.2f} (target <= 1.3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
