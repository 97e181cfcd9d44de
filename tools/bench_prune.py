"""Structured pruning benchmark: accuracy, size, MACs and onnxruntime latency at FLOPs targets, with and
without least-squares reconstruction, plus torch-pruning side by side on the digits CNN.

    python -m tools.bench_prune                 # everything (~25 min on 2 loaded cores)
    python -m tools.bench_prune --json out.json # also write the numbers
    python -m tools.bench_prune --only latency  # the ResNet latency target alone (~4 min)
    python -m tools.bench_prune --only plans    # every count plan --allocate latency could pick, timed (~1.5 min)

What is measured, per model:

* digits CNN (trained for real): top-1 accuracy on the held-out digits split; calibration = 512 images of
  the *training* split, so no test image is seen.
* small ResNet / MobileNetV2 (random weights, BN calibrated): top-1 agreement with the unpruned model and
  output SQNR on 300 held-out natural image crops (scikit-learn's ``flower.jpg``); calibration = 128
  crops of the other sample photo (``china.jpg``).
* small BERT (random weights): output SQNR on 200 held-out random token sequences; 64 for calibration.
* latency: onnxruntime CPU (ORT_ENABLE_ALL, 2 intra-op threads, allow_spinning 0), the variants and the
  unpruned model interleaved in one process (A B C, B C A, ...; each model warm in its round: the median
  of a ~5 ms block of back-to-back calls); a variant's ratio is the median over rounds of
  its time over the unpruned model's time *in the same round* (wall clock, and process CPU time, which other
  processes on a shared machine stretch less), so drift of the machine's speed cancels. ``--only latency``
  measures the ResNet latency target on its own: the small ResNet at 50 % FLOPs, both exporters, batch 1
  and 8, ~30 s of rounds per batch. ResNet-50 (224x224) at 50 % FLOPs too.
* torch-pruning (if installed: ``pip install torch-pruning``, a benchmark-only dependency) on the same
  PyTorch digits CNN, loaded with the ONNX model's own weights, at the same per-layer ratio with group L1
  importance, the same layers protected (first conv, classifier output), no fine-tuning.

Variants: ``l1`` (data-free, nothing refit), ``l1+bn`` (same channels, BatchNorm statistics re-estimated on
calibration data, nothing else), ``l1+refit`` (least-squares refit of the layers that lost inputs, BN
statistics left), ``l1+refit+bn`` (both: what ``graphopt prune --calib`` does by default), ``recon+refit+bn``
(channels ranked by the error left after refitting), and both ends again with kept channel counts rounded
down to multiples of 8 (``--round 8``): onnxruntime's blocked conv kernels run odd channel counts slowly,
which can make a pruned net *slower*; ``--latency``: counts in whole NCHWc blocks and, above 4 blocks, whole
filter sets of 4 blocks (see ``passes/prune/plan.py``), and whole residual branches removed where blocks alone
cannot meet the target (``passes/prune/branches.py``); ``--allocate latency``: the same allowed counts, but
per group, chosen by timing pruned copies in onnxruntime (most time saved per MAC removed first; each prune
allocates afresh, so two variants may get different counts: the spread shows the timing noise).

torch-pruning rows: at the same per-layer ratio and at the same FLOPs target (each tool bisecting its own
uniform ratio on Conv+Linear MACs), with and without BN re-estimation (PyTorch: train-mode running statistics
over the same calibration images; graphopt: ``l1+bn``). Params exclude BN running mean/var on both sides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

import graphopt
from graphopt.passes.prune import PruneConfig, prune
from graphopt.timing import measure_interleaved
from tools.bench.pairing import paired_ratio
from tools.bench.sessions import cpu_session
from tools.zoo import MODELS, build, load_data, make_inputs

log = logging.getLogger("bench_prune")
TARGETS = (0.7, 0.5, 0.3)
# variant -> PruneConfig fields; "calib" marks the variants that get calibration data
VARIANTS = {
    "l1": {},
    "l1+bn": {"calib": True, "reconstruct": False},
    "l1+refit": {"calib": True, "bn_stats": "off"},
    "l1+refit+bn": {"calib": True},
    "recon+refit+bn": {"calib": True, "criterion": "recon"},
    "l1 --round 8": {"round_to": 8},
    "recon+refit+bn --round 8": {"calib": True, "criterion": "recon", "round_to": 8},
    "l1 --latency": {"latency": True},
    "recon+refit+bn --latency": {"calib": True, "criterion": "recon", "latency": True},
    "recon+refit+bn --allocate latency": {"calib": True, "criterion": "recon", "allocate": "latency"},
}
# the ResNet latency target's variants: (label, PruneConfig fields); channel choice does not change latency
LATENCY_VARIANTS = (("l1", {}), ("l1 --round 8", {"round_to": 8}), ("l1 --latency", {"latency": True}),
                    ("l1+refit+bn --latency", {"calib": True, "latency": True}),
                    ("l1 --allocate latency", {"allocate": "latency"}),
                    ("l1+refit+bn --allocate latency", {"calib": True, "allocate": "latency"}))


def session(model: bytes | str) -> ort.InferenceSession:
    return cpu_session(model, "all", threads=2)


def timed(models: dict[str, bytes], feeds: dict, rounds: int, min_seconds: float = 0.0) -> dict[str, dict]:
    """Median ms of each model and its ratio to ``models["unpruned"]``: the median over rounds of the two
    timings taken in the same round (wall clock, and process CPU time), variants interleaved."""
    calls = {key: partial(session(data).run, None, feeds) for key, data in models.items()}
    stats = measure_interleaved(calls, runs=rounds, warmup=5, min_seconds=min_seconds, max_runs=4000)
    base = stats["unpruned"]
    return {key: {"latency_ms": s.median_ms, "latency_x": paired_ratio(s.samples_ms, base.samples_ms),
                  "cpu_x": paired_ratio(s.cpu_samples_ms, base.cpu_samples_ms), "rounds": s.runs}
            for key, s in stats.items()}


def crops(photo: int, count: int, size: int, seed: int) -> np.ndarray:
    """Random natural crops (scale 1-3x, per-channel standardized) of a scikit-learn sample photo."""
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[photo].astype(np.float32) / 255.0
    image = (image - image.mean((0, 1))) / image.std((0, 1))
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        step = int(rng.integers(1, 4))
        span = size * step
        y, x = rng.integers(0, image.shape[0] - span), rng.integers(0, image.shape[1] - span)
        patch = image[y: y + span: step, x: x + span: step]
        out[i] = (patch[:, ::-1] if rng.random() < 0.5 else patch).transpose(2, 0, 1)
    return out


def run_all(model: bytes | str, feeds: list[dict]) -> np.ndarray:
    s = session(model)
    return np.concatenate([s.run(None, f)[0].reshape(len(next(iter(f.values()))), -1) for f in feeds])


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    noise = ((ref - got).astype(np.float64) ** 2).sum()
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / noise)) if noise > 0 else float("inf")


def bench_model(name: str, calib, held: list[dict], score: Callable[[np.ndarray, np.ndarray], dict],
                latency_feeds: dict, rows: list[dict]) -> None:
    original = open(build(name), "rb").read()
    ref = run_all(original, held)
    models = {"unpruned": original}
    base = graphopt.load(original)
    rows.append({"model": name, "target": 1.0, "variant": "unpruned", **score(ref, ref), "macs": None,
                 "params": sum(v.const.size for v in base.graph.initializers.values())})
    for target in TARGETS:
        for variant, fields in VARIANTS.items():
            model = graphopt.load(original)
            fields = dict(fields)
            data_for = calib if fields.pop("calib", False) else None
            start = time.perf_counter()
            report = prune(model, PruneConfig(flops=target, calib=data_for, **fields))
            seconds = time.perf_counter() - start
            data = graphopt.to_bytes(model)
            key = f"{target}/{variant}"
            models[key] = data
            got = run_all(data, held)
            rows.append({"model": name, "target": target, "variant": variant, **score(ref, got),
                         "macs": report.macs_kept, "params": report.params_after, "prune_s": seconds})
            log.info("%s %s: %s", name, key, rows[-1])
    lat = timed(models, latency_feeds, rounds=100, min_seconds=20.0)
    for row in rows:
        if row["model"] == name:
            row.update(lat["unpruned" if row["variant"] == "unpruned" else f"{row['target']}/{row['variant']}"])


def digits_rows(rows: list[dict]) -> None:
    from tools.zoo.data import digits_split

    test = load_data("digits")
    calib = {"images": digits_split(0)["train_images"][:512]}
    held = [{"images": test["images"]}]

    def score(ref, got):
        return {"top1": float((got.argmax(1) == test["labels"]).mean()), "agree": float((ref.argmax(1) == got.argmax(
            1)).mean()), "sqnr_db": sqnr(ref, got)}

    bench_model("digits_cnn_torchscript", calib, held, score, {"images": test["images"][:1]}, rows)


def cnn_rows(name: str, rows: list[dict]) -> None:
    size = MODELS[name].inputs["images"].shape[-1]
    calib = {"images": crops(0, 128, size, 1)}
    held_images = crops(1, 300, size, 2)
    held = [{"images": held_images[i: i + 50]} for i in range(0, 300, 50)]

    def score(ref, got):
        return {"agree": float((ref.argmax(1) == got.argmax(1)).mean()), "sqnr_db": sqnr(ref, got)}

    bench_model(name, calib, held, score, {"images": held_images[:1]}, rows)


def bert_rows(rows: list[dict]) -> None:
    name = "bert_torchscript"
    spec = MODELS[name]
    calib = [make_inputs(spec, seed=1000 + i) for i in range(64)]
    held = [make_inputs(spec, seed=5000 + i) for i in range(200)]

    def score(ref, got):
        return {"sqnr_db": sqnr(ref, got)}

    bench_model(name, calib, held, score, make_inputs(spec, seed=1), rows)


def resnet50_rows(rows: list[dict]) -> None:
    name = "resnet50_torchscript"
    original = open(build(name), "rb").read()
    models = {"unpruned": original}
    reports = {}
    for key, fields in (("--round 1", {}), ("--round 8", {"round_to": 8}), ("--latency", {"latency": True})):
        model = graphopt.load(original)
        reports[key] = prune(model, PruneConfig(flops=0.5, **fields))
        models[key] = graphopt.to_bytes(model)
    lat = timed(models, make_inputs(MODELS[name]), rounds=15)
    rows.append({"model": name, "target": 1.0, "variant": "unpruned", **lat["unpruned"]})
    for key, report in reports.items():
        rows.append({"model": name, "target": 0.5, "variant": f"l1 {key}", "macs": report.macs_kept,
                     "params": report.params_after, **lat[key]})


def latency_rows(rows: list[dict], names=("resnet_torchscript", "resnet_dynamo"), batches=(1, 8),
                 target: float = 0.5, seconds: float = 30.0) -> None:
    """The latency target: the small ResNet at ``target`` FLOPs, each exporter, batch 1 and 8, all variants and
    the unpruned model interleaved in one process (``seconds`` of rounds per batch), with their agreement and
    SQNR on held-out crops."""
    for name in names:
        size = MODELS[name].inputs["images"].shape[-1]
        calib = {"images": crops(0, 128, size, 1)}
        held = crops(1, 300, size, 2)
        original = open(build(name), "rb").read()
        ref = run_all(original, [{"images": held}])
        models, scores = {"unpruned": original}, {"unpruned": {}}
        for label, fields in LATENCY_VARIANTS:
            fields = dict(fields)
            data_for = calib if fields.pop("calib", False) else None
            model = graphopt.load(original)
            report = prune(model, PruneConfig(flops=target, calib=data_for, **fields))
            models[label] = graphopt.to_bytes(model)
            got = run_all(models[label], [{"images": held}])
            scores[label] = {"macs": report.macs_kept, "params": report.params_after,
                             "agree": float((ref.argmax(1) == got.argmax(1)).mean()), "sqnr_db": sqnr(ref, got),
                             "channels": "/".join(str(g.channels_after) for g in report.groups
                                                 if g.status != "blocked")}
        for batch in batches:
            lat = timed(models, {"images": held[:batch]}, rounds=50, min_seconds=seconds)
            for label, score in scores.items():
                rows.append({"model": f"{name} b{batch}", "target": target if score else 1.0, "variant": label,
                             **score, **lat[label]})
            log.info("%s batch %d: %s", name, batch, {k: round(v["latency_x"], 3) for k, v in lat.items()})


def plan_rows(rows: list[dict], name: str = "resnet_torchscript", batch: int = 1, target: float = 0.5,
              seconds: float = 40.0) -> None:
    """Every count plan ``--allocate latency`` chooses from that keeps at most ``target`` of the MACs and cannot
    raise any group one allowed step without exceeding it, all timed interleaved with the unpruned model: how
    much a per-group choice of the allowed counts could gain at all."""
    from graphopt.passes.prune import analyze
    from graphopt.passes.prune.allocate import pruned_copy
    from graphopt.passes.prune.cost import model_cost
    from graphopt.passes.prune.groups import default_protected
    from graphopt.passes.prune.plan import FILTER_SET, allocation_steps, cpu_block, removed_counts
    from graphopt.passes.prune.probe import probe_shapes
    from graphopt.pipeline import PassContext, get_pass

    original = open(build(name), "rb").read()
    model = graphopt.load(original)
    get_pass("lift-constants").run(model, PassContext())
    proto = graphopt.to_proto(model)
    shapes = probe_shapes(model, proto)
    protect = default_protected(model)
    analysis = analyze(model, shapes, protect)
    groups = [g for g in analysis.groups if g.prunable]
    steps = list(allocation_steps(analysis, groups, target, cpu_block(), FILTER_SET).values())
    total = model_cost(analysis, {})[0]

    def share(counts) -> float:
        keep = {g.id: c for g, c in zip(groups, counts, strict=True)}
        return model_cost(analysis, removed_counts(analysis, keep))[0] / total

    def maximal(counts) -> bool:
        ups = [counts[:i] + (next(c for c in steps[i] if c > counts[i]),) + counts[i + 1:]
               for i in range(len(counts)) if counts[i] < steps[i][-1]]
        return all(share(up) > target for up in ups)

    plans = [c for c in itertools.product(*steps) if share(c) <= target and maximal(c)]
    models = {"unpruned": original}
    for counts in plans:
        keep = {g.id: c for g, c in zip(groups, counts, strict=True)}
        models["/".join(map(str, counts))] = pruned_copy(proto, shapes, protect, keep)
    held = crops(1, batch, MODELS[name].inputs["images"].shape[-1], 2)
    lat = timed(models, {"images": held}, rounds=50, min_seconds=seconds)
    rows.append({"model": f"{name} b{batch}", "target": 1.0, "variant": "unpruned", **lat["unpruned"]})
    for counts in sorted(plans, key=lambda c: lat["/".join(map(str, c))]["latency_x"]):
        key = "/".join(map(str, counts))
        rows.append({"model": f"{name} b{batch}", "target": target, "variant": "counts", "channels": key,
                     "macs": share(counts), **lat[key]})


def torch_macs(model, example) -> float:
    """Conv and Linear multiply-accumulates per sample (what graphopt's cost model counts)."""
    import torch

    total = [0.0]

    def hook(module, _inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            total[0] += output[0].numel() * module.weight[0].numel()
        else:
            total[0] += module.weight.numel()

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    return total[0]


def torch_prune(trained, width: int, ratio: float):
    """A fresh copy of the trained digits CNN pruned by torch-pruning at ``ratio`` (group L1, same protected
    layers as graphopt's defaults: the first conv and the classifier output)."""
    import torch
    import torch_pruning as tp

    from tools.zoo.vision import DigitsCNN

    model = DigitsCNN(width)
    model.load_state_dict(trained.state_dict())
    model.eval()
    pruner = tp.pruner.MagnitudePruner(model, torch.zeros(1, 1, 8, 8),
                                       importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
                                       ignored_layers=[model.features[0], model.classifier[4]])
    pruner.step()
    return model


def torch_ratio_for_flops(trained, width: int, target: float) -> float:
    """The smallest uniform torch-pruning ratio keeping at most ``target`` of the MACs (bisection, as graphopt's
    ``--flops`` does on its own cost model)."""
    import torch

    example = torch.zeros(1, 1, 8, 8)
    budget = target * torch_macs(trained, example)
    low, high = 0.0, 0.9
    for _ in range(30):
        mid = (low + high) / 2
        if torch_macs(torch_prune(trained, width, mid), example) <= budget:
            high = mid
        else:
            low = mid
    return high


def bn_recalibrated(model, images: np.ndarray):
    """PyTorch's own BN re-estimation (adaptive BN): cumulative batch statistics over the calibration images."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), 64):
            model(torch.from_numpy(images[i: i + 64]))
    model.eval()
    return model


def torch_pruning_rows(rows: list[dict], ratios=(0.5, 0.3)) -> None:
    """torch-pruning vs graphopt on the same PyTorch digits CNN, group L1, no fine-tuning: at the same per-layer
    ratio, and at the same FLOPs target (each tool finding its own uniform ratio); with BN re-estimation on
    calibration data on both sides (PyTorch's train-mode statistics vs graphopt's)."""
    try:
        import torch
        import torch_pruning  # noqa: F401
    except ImportError as exc:
        rows.append({"model": "torch-pruning", "variant": f"not installed ({exc})"})
        return
    from importlib.metadata import version

    from tools.zoo.data import digits_split
    from tools.zoo.registry import DIGITS
    from tools.zoo.vision import DigitsCNN, accuracy

    test = load_data("digits")
    original = open(build("digits_cnn_torchscript"), "rb").read()
    trained = DigitsCNN(DIGITS["width"])  # the very weights graphopt prunes: the export kept the state_dict names
    state = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
             for i in onnx.load_from_string(original).graph.initializer}
    missing = trained.load_state_dict(state, strict=False).missing_keys
    if any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"digits ONNX initializers do not cover the PyTorch model: {missing}")
    trained.eval()
    rows.append({"model": "digits (PyTorch)", "target": 1.0, "variant": "unpruned (the ONNX model's weights)",
                 "top1": accuracy(trained, test["images"], test["labels"]), "macs": 1.0})
    calib = {"images": digits_split(0)["train_images"][:512]}
    example = torch.zeros(1, 1, 8, 8)
    macs0 = torch_macs(trained, example)
    tp_name = f"torch-pruning {version('torch-pruning')}"
    cases = [("ratio", r, r) for r in ratios] + [("flops", f, torch_ratio_for_flops(trained, DIGITS["width"], f))
                                                 for f in TARGETS]
    for kind, target, ratio in cases:
        label = f"ratio {target:g}" if kind == "ratio" else f"flops {target:g}"
        for recal in (False, True):
            model = torch_prune(trained, DIGITS["width"], ratio)
            if recal:
                model = bn_recalibrated(model, calib["images"])
            params = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
                         and not k.endswith(("running_mean", "running_var")))
            rows.append({"model": "digits (PyTorch)", "target": label, "params": params,
                         "variant": tp_name + (" + BN recal" if recal else "") + f" (ratio {ratio:.3f})",
                         "macs": torch_macs(model, example) / macs0,
                         "top1": accuracy(model, test["images"], test["labels"])})
        for variant, calibrated, refit in (("graphopt l1", False, False), ("graphopt l1+bn", True, False),
                                           ("graphopt l1+refit+bn", True, True)):
            pruned = graphopt.load(original)
            config = PruneConfig(calib=calib if calibrated else None, reconstruct=refit,
                                 **({"ratio": target} if kind == "ratio" else {"flops": target}))
            report = prune(pruned, config)
            logits = session(graphopt.to_bytes(pruned)).run(None, {"images": test["images"]})[0]
            rows.append({"model": "digits (ONNX)", "target": label, "macs": report.macs_kept,
                         "variant": f"{variant} (ratio {report.ratio:.3f})",
                         "top1": float((logits.argmax(1) == test["labels"]).mean()),
                         "params": report.params_after - _bn_stats_params(pruned)})


def _bn_stats_params(model: graphopt.Model) -> int:
    """Running mean/var elements: buffers, not parameters, in PyTorch's count."""
    return sum(n.inputs[i].const.size for n in model.graph if n.op_type == "BatchNormalization" for i in (3, 4))


def render(rows: list[dict]) -> Table:
    table = Table("model", "target", "variant", "top-1", "agree", "SQNR dB", "MACs", "params", "latency ms",
                  "x wall", "x CPU", title="graphopt prune (FLOPs target = fraction of MACs kept; torch-pruning rows: "
                  "per-layer ratio; x = median over rounds of pruned/unpruned timed in the same round)")

    def fmt(value, spec):
        return "" if value is None else value if isinstance(value, str) else format(value, spec)

    for r in rows:
        variant = r["variant"] + (f" [{r['channels']}]" if r.get("channels") else "")
        table.add_row(r["model"], fmt(r.get("target"), "g"), variant, fmt(r.get("top1"), ".4f"),
                      fmt(r.get("agree"), ".3f"), fmt(r.get("sqnr_db"), ".1f"), fmt(r.get("macs"), ".3f"),
                      fmt(r.get("params"), ",.0f"), fmt(r.get("latency_ms"), ".3f"), fmt(r.get("latency_x"), ".3f"),
                      fmt(r.get("cpu_x"), ".3f"))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--only",
                        help="comma-separated sections: digits,resnet,mobilenet,bert,resnet50,latency,plans,tp")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("graphopt").setLevel(logging.WARNING)
    sections = {
        "digits": digits_rows,
        "resnet": lambda rows: cnn_rows("resnet_torchscript", rows),
        "mobilenet": lambda rows: cnn_rows("mobilenet_torchscript", rows),
        "bert": bert_rows,
        "resnet50": resnet50_rows,
        "latency": latency_rows,
        "plans": plan_rows,
        "tp": torch_pruning_rows,
    }
    chosen = args.only.split(",") if args.only else list(sections)
    rows: list[dict] = []
    for key in chosen:
        sections[key](rows)
    Console(width=160).print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
