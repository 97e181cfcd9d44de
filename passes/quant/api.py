"""``quantize(model, calib, config)``: fusions, calibration, QDQ/dynamic/weight-only insertion, the accuracy
budget, the latency check, the per-tensor error report, and a final onnxruntime check before returning."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from operator import itemgetter

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.errors import GraphoptError
from graphopt.ir import Attr, Model
from graphopt.onnx_io import ModelLike, to_bytes, to_proto
from graphopt.onnx_io.random_ops import draws_random, seed_value
from graphopt.passes.prune.calib import run_exposed
from graphopt.pipeline import PassContext, get_pass
from graphopt.timing import interleaved_ratios

from .align import flatten_channels_last, pad_input_channels
from .budget import fit_budget, sensitivities
from .calib import CalibSource, load_calibration
from .config import QuantConfig
from .dynamic import insert_dynamic
from .evaluate import Outputs, metric_value, output_errors, paired_latency, run_outputs, session
from .observe import float_tensors, observe, progress_bar
from .optable import STATIC_KINDS, WEIGHT_KINDS, fused_kinds, saturating_u8s8, speedup
from .plan import Candidate, Plan, make_plan, observed_tensors
from .prepare import spatial_means_to_pooling
from .qdq import Inserted, insert_static, insert_weight_only
from .qparams import qrange
from .ranges import clip_range
from .report import EXCLUDED, LATENCY, RANGES, SENSITIVITY, UNSUPPORTED, FloatNode, LayerError, QuantReport
from .smooth import Smoothing, apply_smoothing, plan_smoothing

log = logging.getLogger(__name__)

MIN_EVAL, EVAL_SECONDS = 8, 10.0  # the dynamic/weight-only reference stops after 10 s once it has 8 samples
#: int8 is kept only when it takes at most this share of fp32's time: at parity the speed gain is noise
#: and the accuracy loss is real. 0.95: the A/A control of tools/bench_quant.py read 0.96-1.07 here, and at
#: 0.97 the digits CNN came back int8 at a benchmarked 1.03x (output SQNR 40 dB) for no real gain. A ratio
#: under it is timed twice and the slower reading decides: one 2 s timing under load once kept the small
#: ResNet int8 for a benchmarked 1.02x.
PAYS_BELOW = 0.95
#: The first layers stay float (or their input channels are padded) when that makes the int8 model take at most
#: FLOAT_PREFIX_BELOW of the all-int8 time, or at most FLOAT_PREFIX_AS_FAST of it with at most FLOAT_PREFIX_ERROR
#: of its output error, in two timings (see _first_layers); at most MAX_FLOAT_PREFIX layers are tried.
FLOAT_PREFIX_BELOW, FLOAT_PREFIX_AS_FAST, FLOAT_PREFIX_ERROR, MAX_FLOAT_PREFIX = 0.97, 1.02, 0.9, 4
SQNR_SAMPLES = 2  # per-tensor SQNR runs both models with every quantized tensor exposed: a few samples
#: A Concat stays float when one input spans less than this share of all inputs' union range (4 bits lost).
CONCAT_MIN_SPAN = 1 / 16
#: A node whose activation input reaches this magnitude, this many times beyond its other inputs, is adding a
#: mask's sentinel (old BERT exports use -10000) and stays float.
MASK_SENTINEL, MASK_RATIO = 1e4, 100.0
#: A node one of whose activations spans less than this (zero aside) stays float: its int8 scale, and an int32
#: bias's (that scale times a weight's), would not be normal float32 numbers.
MIN_SPAN = 1e-17
KEEP_SMOOTHING = 0.9  # kept where the output error drops by a tenth: an unfolded 1/s is one more op per activation

Calibration = CalibSource | Iterable[Mapping[str, np.ndarray]]
Ranges = Mapping[str, tuple[float, float]]  # tensor name -> calibrated (low, high)


def quantize(model: Model | ModelLike, calib: Calibration, config: QuantConfig | None = None
             ) -> tuple[Model, QuantReport]:
    """Quantize a model (path, bytes, ModelProto or graphopt Model, which is left untouched).

    Returns the quantized graphopt Model (checked to load and run in onnxruntime) and a QuantReport.
    """
    config = config or QuantConfig()
    config.check()
    clock = _Clock()
    model = graphopt.load(to_bytes(model) if isinstance(model, Model) else model)
    seeded = _seed_random_ops(model)  # every candidate draws the numbers the fp32 reference draws
    samples = load_calibration(calib, model, config.calib_samples)  # checked before any work
    latency_feed = _batched(model, samples[0], config.latency_batch)
    exported = {n.name for n in model.nodes()}
    if missing := sorted(set(config.nodes_to_exclude) - exported):
        raise GraphoptError(f"no node named {missing[0]!r} to exclude",
                            hint="give node names as `graphopt inspect --json` or Netron show them")
    # fused in full only when a latency check or the float fallback asks for it (_Job.fastest_fp32)
    unfused = to_bytes(model) if config.fuse and config.mode != "weight_only" else None
    if config.fuse:
        # Packed-QKV Attention computes its projections inside one float op; left as MatMuls feeding
        # MultiHeadAttention they can be quantized (a quarter of a transformer layer's MACs; MiniLM dynamic
        # 1.5x -> 2.3x, static 1.75x -> 2.08x). The FFN padding is for float32 rows: 3072 int8 values are
        # 3 KiB and do not alias.
        disable = ["pad-aliased-ffn"] + (["pack-qkv-attention"] if config.mode != "weight_only" else [])
        graphopt.optimize(model, level="fuse", disable=disable)
    get_pass("lift-constants").run(model, PassContext())
    if config.mode == "static":
        spatial_means_to_pooling(model)
    _name_nodes(model)
    clock.lap("prepare")
    fp32 = to_bytes(model)
    report = QuantReport(config.mode, config.method if config.mode == "static" else "-", config.activation_type,
                         config.per_channel, len(samples), max_error=config.max_error,
                         latency_batch=config.latency_batch)
    fused_away = sorted(set(config.nodes_to_exclude) - {n.name for n in model.nodes()})
    report.notes += [f"--exclude {name}: fused with its neighbours into a differently named op, which may be "
                     "quantized; exclude that op's name (`graphopt optimize` output) instead" for name in fused_away]
    plan, ranges, reference = _plan_and_ranges(model, samples, config)
    clock.lap("calibrate")
    smoothings = []
    if config.mode in ("dynamic", "static") and config.smooth and plan.candidates:
        smoothings, notes = plan_smoothing(model, plan.candidates, samples, config)
        report.notes += notes
        clock.lap("smoothing plan")
    job = _Job(fp32, config, ranges, samples, reference, latency_feed, smoothings, unfused)
    clock.lap("fp32 reference")
    selected = set(plan.candidates)
    if config.mode == "dynamic" and config.reduce_range is None and saturating_u8s8() and selected:
        _choose_weight_scheme(job, selected, report)
        clock.lap("weight scheme")
    if job.smoothings and selected:
        _keep_smoothing_if_better(job, selected, report)
        clock.lap("smoothing check")
    if config.max_error is not None and selected:
        selected = _fit_budget(job, plan, selected, report)
        clock.lap("budget")
    pad_inputs = False
    if config.latency_aware and selected and config.mode != "weight_only":  # weight-only is for size, not speed
        selected, pad_inputs = _pay_or_fall_back(job, plan, selected, report)
        if selected and config.mode == "static":
            selected, pad_inputs = _first_layers(job, model, plan, selected, pad_inputs, report)
        if pad_inputs:
            report.notes.append(f"input channels padded for the int8 conv kernel: the model took "
                                f"{report.latency_ratio:.2f}x fp32's time ({report.latency_ms['quantized']:.3f} vs "
                                f"{report.latency_ms['fp32']:.3f} ms)")
        clock.lap("latency")
    quantized, inserted = job.build(selected, pad_inputs) if selected else (job.fastest_fp32, Inserted())
    got = run_outputs(quantized, job.eval_feeds)  # never hand back a model onnxruntime cannot run
    report.output_error = output_errors(job.reference, got)
    report.output_error["metric"] = job.error(got)
    if config.max_error is not None:
        report.budget_met = report.output_error["metric"] <= config.max_error
    report.quantized_nodes = len(inserted.quantized)
    report.notes += inserted.notes
    if not inserted.quantized:
        report.notes.append("no node was quantized (each one's reason is in the table): the output is the float "
                            "model, with graphopt's lossless fusions unless they were turned off")
    report.layers = inserted.weights + _activation_errors(fp32, quantized, inserted, job.sens_feeds[:SQNR_SAMPLES])
    report.kept_float = plan.kept_float + report.kept_float  # + those the budget and latency steps gave back
    report.size_bytes = {"fp32": len(fp32), "quantized": len(quantized)}
    clock.lap("check")
    report.timings_s = clock.laps
    return _unseed_random_ops(graphopt.load(quantized), seeded), report


def _seed_random_ops(model: Model) -> set[str]:
    """Give each random op that sets no seed one derived from its name (as verification does); the first
    outputs of those nodes."""
    seeded = set()
    for node in model.nodes():
        if draws_random(node.op_type, node.domain, node.inputs) and "seed" not in node.attrs:
            node.attrs["seed"] = Attr.infer("seed", seed_value(node.op_type, node.name, node.outputs[0].name))
            seeded.add(node.outputs[0].name)
    return seeded


def _unseed_random_ops(model: Model, seeded: set[str]) -> Model:
    """The quantized model draws fresh numbers in every session again, as the original does."""
    for node in model.nodes():
        if draws_random(node.op_type, node.domain, node.inputs) and node.outputs[0].name in seeded:
            del node.attrs["seed"]
    return model


def _batched(model: Model, sample: Mapping[str, np.ndarray], batch: int | None) -> Mapping[str, np.ndarray]:
    """The feed the latency checks time: ``sample`` repeated ``batch`` times along each input's leading axis,
    which the model must leave free (a batch axis)."""
    if batch is None:
        return sample
    for value in model.graph.inputs:
        shape = value.type.shape if value.type is not None else None
        if value.name in sample and (not shape or isinstance(shape[0], int)):
            raise GraphoptError(f"latency batch {batch}: input {value.name!r} has no free leading (batch) axis "
                                f"(shape {list(shape) if shape else 'unknown'})",
                                hint="leave the latency batch out for a model with a fixed batch")
    return {name: np.concatenate([x] * batch, axis=0) for name, x in sample.items()}


class _Clock:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.laps["total"] = now - self.start
        self.last = now


def _name_nodes(model: Model) -> None:
    """Every node gets a unique name: reports and the budget refer to nodes by name."""
    seen: set[str] = set()
    for node in model.graph:
        if not node.name or node.name in seen:
            node.name = model.graph.fresh_name(f"{node.op_type}_{len(seen)}")
        seen.add(node.name)


def _kinds(config: QuantConfig) -> tuple[set[str], set[str], str]:
    """(kinds the mode can quantize, kinds to quantize, why the others are not)."""
    if config.mode == "dynamic":
        allowed = {"MatMul", "Gemm"}
    elif config.mode == "weight_only":
        allowed = set(WEIGHT_KINDS)
    else:
        allowed = set(STATIC_KINDS)
    if config.op_types is not None:
        def op_type(kind: str) -> str:
            return kind.replace("1x1", "").replace("Depthwise", "")

        unknown = set(config.op_types) - {op_type(k) for k in allowed}
        if unknown:
            raise GraphoptError(f"cannot quantize op types {sorted(unknown)} in {config.mode} mode",
                                hint=f"supported: {', '.join(sorted({op_type(k) for k in allowed}))}")
        return allowed, {k for k in allowed if op_type(k) in config.op_types}, EXCLUDED
    if config.mode == "static":
        return allowed, allowed & fused_kinds(), UNSUPPORTED
    return allowed, allowed, UNSUPPORTED


def _plan_and_ranges(model: Model, samples, config: QuantConfig
                     ) -> tuple[Plan, dict[str, tuple[float, float]], list[dict[str, np.ndarray]]]:
    """Candidates, their calibrated activation ranges, and the fp32 outputs of the first eval samples.

    Samples run one at a time (not batched): their outputs are the fp32 reference for the error metric.
    """
    allowed, kinds, why_not = _kinds(config)
    plan = make_plan(model, kinds, set(config.nodes_to_exclude), config.mode == "weight_only", allowed, why_not)
    if config.mode != "static" or not plan.candidates:
        return plan, {}, []
    proto = to_proto(model)
    tensors = plan.tensors(absorb=not config.symmetric)
    dtypes = _known_dtypes(model, tensors)
    unknown = [t for t in tensors if t not in dtypes]
    if unknown:
        dtypes.update(float_tensors(proto, unknown, samples[0]))
    with progress_bar(config.progress) as bar:
        stats, reference = observe(proto, [t for t in tensors if dtypes.get(t) == "float32"], samples,
                                   config.method != "minmax", bar, keep_outputs=config.eval_samples)
    levels = qrange(np.dtype(config.activation_type))
    ranges = {name: clip_range(h, config.method, levels[1] - levels[0] + 1, config.percentile)
              for name, h in stats.items()}
    for name, cand in list(plan.candidates.items()):
        needed = [cand.node.inputs[i].name for i in cand.activations]
        missing = [t for t in needed if t not in ranges]
        if missing:
            del plan.candidates[name]
            plan.kept_float.append(FloatNode(name, cand.node.op_type, UNSUPPORTED,
                                             f"{missing[0]} is {dtypes.get(missing[0], 'not float')}"))
    _float_where_ranges_do_not_fit(plan, ranges, absorb=not config.symmetric)
    return plan, ranges, reference


def _unequal_concat(cand: Candidate, ranges: Ranges, absorb: bool) -> str | None:
    """An int8 Concat copies its inputs at one scale (their union range), so an input spanning a small part
    of that range keeps only a few levels: ViT's class token, concatenated with the patch embeddings,
    came out at 9 dB SQNR, and the class-token output row, the one a classifier reads, had 3x the error
    (1 - cos 0.00098 against 0.00034 with the Concat float)."""
    if cand.kind != "Concat":
        return None
    inputs = [cand.node.inputs[i].name for i in cand.activations]
    spans = {n: ranges[n][1] - ranges[n][0] for n in inputs}
    union = max(ranges[n][1] for n in inputs) - min(ranges[n][0] for n in inputs)
    narrow = min(spans, key=spans.__getitem__)
    if spans[narrow] >= union * CONCAT_MIN_SPAN:
        return None
    return (f"input {narrow} spans {spans[narrow]:.3g} of the {union:.3g} its int8 copy would share: too few "
            "levels left for it")


def _sum_with_a_mask(cand: Candidate, ranges: Ranges, absorb: bool) -> str | None:
    """A node adding an attention mask's sentinel (-3.4e38, -1e9, -10000 where a position is masked) to scores
    of a few units: int8 would spend every level of the sum on the sentinel, and the softmax after it would
    read garbage (T5's encoder, whose position bias carries the mask: output cosine 0.94 with the Add int8)."""
    reach = {n: max(abs(ranges[n][0]), abs(ranges[n][1])) for n in (cand.node.inputs[i].name for i in cand.activations)}
    if len(reach) < 2:  # one activation, or the same one twice (x * x)
        return None
    widest = max(reach, key=reach.__getitem__)
    others = max(r for n, r in reach.items() if n != widest)
    if reach[widest] < MASK_SENTINEL or reach[widest] < MASK_RATIO * others:
        return None
    return (f"input {widest} reaches {reach[widest]:.3g}, {MASK_RATIO:g}x beyond the other inputs ({others:.3g}): "
            "a mask's sentinel")


def _vanishing_range(cand: Candidate, ranges: Ranges, absorb: bool) -> str | None:
    """Activations that shrink towards zero (an EfficientNet with random weights reached 1e-45 by its fifth
    block) would get a scale of 0: the nodes reading or writing them stay float. Every such node is found
    from both sides, so no QuantizeLinear is left on the tensor."""
    spans = {t: max(ranges[t][1], 0.0) - min(ranges[t][0], 0.0) for t in observed_tensors(cand, absorb) if t in ranges}
    tiny = [t for t, span in spans.items() if 0 < span < MIN_SPAN]
    return f"{tiny[0]} spans only {spans[tiny[0]]:.3g}: its int8 scale would underflow float32" if tiny else None


#: Calibrated ranges that int8 cannot represent well: each rule gives why its node stays float, or None.
RANGE_RULES: tuple[Callable[[Candidate, Ranges, bool], str | None], ...] = (
    _unequal_concat, _sum_with_a_mask, _vanishing_range)


def _float_where_ranges_do_not_fit(plan: Plan, ranges: Ranges, absorb: bool) -> None:
    for name, cand in list(plan.candidates.items()):
        if why := next((w for rule in RANGE_RULES if (w := rule(cand, ranges, absorb))), None):
            del plan.candidates[name]
            plan.kept_float.append(FloatNode(name, cand.node.op_type, RANGES, why))


def _known_dtypes(model: Model, tensors) -> dict[str, str]:
    """dtypes the IR already knows (from the optimizer's shape inference)."""
    values = {v.name: v for v in model.graph.values()}
    out = {}
    for name in tensors:
        elem = values[name].elem_type if name in values else None
        if elem:
            out[name] = str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return out


class _Job:
    """Builds variants (which nodes stay float) from the fused fp32 model and scores them."""

    def __init__(self, fp32: bytes, config: QuantConfig, ranges, samples, reference: Outputs,
                 latency_feed: Mapping[str, np.ndarray], smoothings: Sequence[Smoothing] = (),
                 unfused: bytes | None = None) -> None:
        self.fp32, self.config, self.ranges, self.latency_feed = fp32, config, ranges, latency_feed
        self.unfused = unfused  # the model as loaded, when fp32 was fused with rules left out for int8
        self.smoothings = smoothings  # applied per build, to the selected readers only: fp32 gets none
        if not reference:
            reference = _timed_reference(fp32, samples[: config.eval_samples])
        self.reference = reference
        self.eval_feeds = samples[: len(reference)]
        self.sens_feeds = samples[: min(config.sensitivity_samples, len(reference))]
        # ((selected, padded), the config and smoothings it was built with (compared by identity), the build)
        self._builds: list[tuple[tuple[frozenset[str], bool], QuantConfig, Sequence[Smoothing],
                                 tuple[bytes, Inserted]]] = []

    @functools.cached_property
    def fastest_fp32(self) -> bytes:
        """graphopt's fully fused model: what int8 must beat, and what comes back if it does not. The quantizer's
        fp32 model leaves Q/K/V unpacked (to quantize them) and the FFN unpadded; the fully fused one ran the
        small transformers 1.30-1.69x the original's speed against 1.08-1.44x (bench_quant, session 13)."""
        if self.unfused is None:
            return self.fp32
        model = graphopt.load(self.unfused)
        graphopt.optimize(model, level="fuse")
        return to_bytes(model)

    @functools.cached_property
    def fp32_session(self) -> ort.InferenceSession:
        """One session of the fastest fp32 model for every latency timing (a GPT-2-base session takes
        seconds)."""
        return session(self.fastest_fp32, label="fp32 model")

    def build(self, selected: set[str], pad_inputs: bool = False) -> tuple[bytes, Inserted]:
        """The model with ``selected`` quantized (and, with ``pad_inputs``, the input channels of convs reading a
        model input padded, see ``align.py``). The last two builds are kept: the latency checks time a model
        padded and not, and the final model is one of them."""
        key = (frozenset(selected), pad_inputs)
        for built_key, config, smoothings, built in self._builds:
            if built_key == key and config is self.config and smoothings is self.smoothings:
                return built
        model = graphopt.load(self.fp32)
        smoothed, divided = apply_smoothing(model, self.smoothings, selected)
        if self.config.mode == "static":
            ranges = {**self.ranges, **{name: sm.bounds for name, sm in divided.items()}}
            inserted = insert_static(model, selected, ranges, self.config)
            for name in divided:  # x / s has no fp32 counterpart to measure its SQNR against
                inserted.activations.pop(name, None)
            for name in flatten_channels_last(model):
                inserted.activations.pop(name, None)  # reordered: its input's row has the same error
            if pad_inputs:
                inserted.padded = pad_input_channels(model)
        elif self.config.mode == "dynamic":
            inserted = insert_dynamic(model, selected, self.config)
        else:
            inserted = insert_weight_only(model, selected, self.config)
        inserted.notes[:0] = smoothed
        self._builds = [*self._builds[-1:], (key, self.config, self.smoothings, (to_bytes(model), inserted))]
        return self._builds[-1][3]

    def error(self, got: Outputs, subset: bool = False) -> float:
        ref = self.reference[: len(got)] if subset else self.reference
        if self.config.user_metric is not None:
            return float(self.config.user_metric(ref, got))
        return metric_value(output_errors(ref, got), self.config.metric)

    def model_error(self, model: bytes) -> float:
        """The output error of a built model on the evaluation samples."""
        return self.error(run_outputs(model, self.eval_feeds))

    def error_of(self, selected: set[str]) -> Callable[[set[str], bool], float]:
        def score(floats: set[str], full: bool) -> float:
            model, _ = self.build(selected - floats)
            feeds = self.eval_feeds if full else self.sens_feeds
            return self.error(run_outputs(model, feeds), subset=not full)
        return score


def _timed_reference(fp32: bytes, samples) -> Outputs:
    """fp32 outputs of the first samples, stopping early on a slow model (at least MIN_EVAL of them):
    every later step runs each candidate model on as many samples."""
    sess = session(fp32, label="fp32 model")
    outputs: Outputs = []
    start = time.perf_counter()
    for sample in samples:
        outputs += run_outputs(sess, [sample], label="fp32 model")
        if len(outputs) >= MIN_EVAL and time.perf_counter() - start > EVAL_SECONDS:
            break
    return outputs


def _choose_weight_scheme(job: _Job, selected: set[str], report: QuantReport) -> None:
    """Dynamic mode where U8S8 kernels saturate: keep the weight scheme with the smallest output error.

    7-bit weights avoid the saturation but lose a bit; which matters more depends on the model (measured
    here: GPT-2 small 52 dB with per-channel 7-bit vs 39 dB with 8-bit; GPT-2-base 35.8 dB vs 37.9 dB
    with per-tensor 8-bit), so each scheme is built and run on the evaluation samples (ties: the first).
    """
    per_channel = job.config.per_channel
    schemes = list(dict.fromkeys([(per_channel, True), (per_channel, False), (False, False)]))
    errors = {}
    for scheme in schemes:
        job.config = replace(job.config, per_channel=scheme[0], reduce_range=scheme[1])
        errors[scheme] = job.model_error(job.build(selected)[0])
    best = min(schemes, key=lambda scheme: errors[scheme])
    job.config = replace(job.config, per_channel=best[0], reduce_range=best[1])
    report.per_channel = best[0]

    def label(scheme: tuple[bool, bool]) -> str:
        return f"{'per-channel' if scheme[0] else 'per-tensor'} {7 if scheme[1] else 8}-bit"

    report.notes.append("weights: " + ", ".join(f"{label(s)} error {errors[s]:.3g}" for s in schemes)
                        + f"; kept {label(best)}")


def _keep_smoothing_if_better(job: _Job, selected: set[str], report: QuantReport) -> None:
    """Smoothing is chosen per activation on a simulated product; keep it only if the model's output error,
    with every chosen activation smoothed, is lower than without."""
    smoothings, errors = job.smoothings, []
    for variant in ((), smoothings):
        job.smoothings = variant
        errors.append(job.model_error(job.build(selected)[0]))
    job.smoothings = smoothings if errors[1] < KEEP_SMOOTHING * errors[0] else ()
    report.notes.append(f"smoothing {len(smoothings)} activation(s): output error {errors[0]:.3g} -> {errors[1]:.3g}; "
                        + ("kept" if job.smoothings else "dropped"))


def _fit_budget(job: _Job, plan: Plan, selected: set[str], report: QuantReport) -> set[str]:
    score = job.error_of(selected)
    full_error = score(set(), True)
    if full_error <= job.config.max_error:
        return selected
    layers = sorted(selected)
    with progress_bar(job.config.progress) as bar:
        task = bar.add_task("sensitivity", total=len(layers)) if bar is not None else None
        _, gains = sensitivities(layers, score, (lambda: bar.advance(task)) if bar is not None else lambda: None)
    report.sensitivity = gains
    order = sorted(layers, key=lambda n: -gains[n])
    floats, error, met = fit_budget(order, job.config.max_error, score)
    for name in order:
        if name in floats:
            report.kept_float.append(FloatNode(name, plan.candidates[name].node.op_type, SENSITIVITY,
                                               f"error {gains[name]:.3g} lower when float"))
    if not met:
        report.notes.append(f"budget {job.config.max_error:g} not met even with every layer float ({error:.3g})")
    return selected - floats


def _pay_or_fall_back(job: _Job, plan: Plan, selected: set[str], report: QuantReport) -> tuple[set[str], bool]:
    """The quantized model must not be slower than fp32: drop the op kinds that pay least until it is not.
    Returns the nodes to quantize and whether the int8 model pays with its input channels padded."""
    kinds = sorted({plan.candidates[n].kind for n in selected}, key=lambda k: speedup(k) or 0.0)
    while True:
        model, pad, ratio, times = _time_int8(job, selected)
        ratio, times = _confirmed(job, model, ratio, times)
        report.latency_ms, report.latency_ratio = times, ratio
        if ratio <= PAYS_BELOW or not selected:
            return selected, pad and ratio <= PAYS_BELOW
        kind = kinds.pop(0) if kinds else None
        dropped = {n for n in selected if plan.candidates[n].kind == kind} if kind else set(selected)
        took = f"{ratio:.2f}x fp32's time ({times['quantized']:.3f} vs {times['fp32']:.3f} ms)"
        note = f"int8 {kind}: the model took {took}" if kind else f"the quantized model took {took}: left in float"
        for name in sorted(dropped):
            report.kept_float.append(FloatNode(name, plan.candidates[name].node.op_type, LATENCY, note))
        selected = selected - dropped
        if not selected:
            report.latency_ms, report.latency_ratio = {"fp32": times["fp32"]}, None
            report.notes.append(note)
            return selected, False


def _confirmed(job: _Job, model: bytes, ratio: float, times: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The int8 model's time / fp32's once a second timing, with fresh sessions of both, agrees on which side of
    PAYS_BELOW it falls; if they disagree a third decides (the median reading). Either verdict can be one
    timing's accident: one 2 s timing under load kept the small ResNet int8 for a benchmarked 1.02x, and one
    in a default benchmark run (session 16) read the digits CNN's fp32 at 0.028 ms (0.034-0.036 in every
    other timing) and gave up all its int8 convs. Where two readings agree, the one nearer the threshold counts."""
    first, second = (ratio, times), paired_latency(model, job.fastest_fp32, job.latency_feed)
    pays = first[0] <= PAYS_BELOW
    if pays == (second[0] <= PAYS_BELOW):
        return (max if pays else min)(first, second, key=itemgetter(0))
    third = paired_latency(model, job.fastest_fp32, job.latency_feed)
    return sorted((first, second, third), key=itemgetter(0))[1]


def _time_int8(job: _Job, selected: set[str]) -> tuple[bytes, bool, float, dict[str, float]]:
    """(model, padded?, its time / fp32's, ms of each): the int8 model timed against fp32. Where ``align.py``
    pads the input channels of a conv reading a model input, that build is timed alongside and the faster of
    the two counts (their outputs are identical): the small ResNet at batch 8 took 1.04x fp32's time unpadded,
    0.83x padded, and judging the unpadded one alone gave up every int8 conv."""
    plain = job.build(selected)[0]
    padded, inserted = job.build(selected, pad_inputs=True)  # pads static convs only; a MiniLM build takes tens of ms
    if not inserted.padded:
        ratio, times = paired_latency(plain, job.fp32_session, job.latency_feed)
        return plain, False, ratio, times
    ratios, ms = interleaved_ratios([job.fp32_session, session(plain), session(padded)], job.latency_feed)
    pad = ratios[2] < ratios[1]
    return (padded if pad else plain), pad, ratios[1 + pad], {"quantized": ms[1 + pad], "fp32": ms[0]}


def _first_layers(job: _Job, model: Model, plan: Plan, selected: set[str], pad: bool, report: QuantReport
                  ) -> tuple[set[str], bool]:
    """How the first quantized layer, when it reads a model input, runs fastest (or, as fast, most accurately):
    int8 (its input channels padded or not, as the pay check found faster, ``pad``) or float together with the
    next few layers. Returns the nodes to quantize and whether to pad.

    That layer sees few channels (an image's 3: an int8 GEMM reducing 27 values, off onnxruntime's fast int8
    conv kernel unless padded) and, int8, has onnxruntime quantize and transpose the raw input; float, it runs
    in the NCHWc kernel made for it, and the float/int8 boundary moves to where the tensor is cheapest to
    convert. The prefixes of 1 to MAX_FLOAT_PREFIX quantized layers (graph order) left float are timed
    together with the all-int8 model; the fastest is kept when it takes at most FLOAT_PREFIX_BELOW of the
    all-int8 time and PAYS_BELOW of fp32's (``_variant_pays``) in that timing and in a second one (fresh
    sessions), so picking the best of several noisy readings cannot decide alone. When none is that much
    faster, the most accurate of those as fast is kept if it is clearly more accurate (``_more_accurate_as_fast``).
    MobileNetV2 (64x64): all-int8 1.23x fp32's speed, the first 3 layers float 1.35x (their int8 kernels with
    8-16 channels ran slower than float). Small ResNet: all-int8 1.31x, padded 1.41-1.47x; every prefix slower (stem
    float 0.89x: its max-pool then runs as a uint8 NCHW kernel)."""
    inputs = {v.name for v in model.graph.inputs}
    order = [n.name for n in model.graph if n.name in selected]
    head = plan.candidates[order[0]] if order else None
    if head is None or not any(head.node.inputs[i].name in inputs for i in head.activations):
        return selected, pad
    all_int8 = job.build(selected, pad)[0]
    variants = [(selected - set(order[:k]), job.build(selected - set(order[:k]))[0], f"first {k} layer(s) float")
                for k in range(1, min(MAX_FLOAT_PREFIX, len(order) - 1) + 1)]
    if not variants:
        return selected, pad
    feed = job.latency_feed
    ratios, ms = interleaved_ratios([job.fp32_session] + [session(m) for m in [all_int8] + [v[1] for v in variants]],
                                    feed)
    best = min(range(len(variants)), key=lambda k: ratios[k + 2])
    share, accuracy = FLOAT_PREFIX_BELOW, ""  # how fast the variant must be, and (if kept as fast) its errors
    if not _variant_pays(ratios[best + 2], ratios[1], share):
        share = FLOAT_PREFIX_AS_FAST
        best, accuracy = _more_accurate_as_fast(job, all_int8, variants, ratios)
        if best is None:
            return selected, pad
    again, ms_again = interleaved_ratios([job.fp32_session, session(all_int8), session(variants[best][1])], feed)
    if not _variant_pays(again[2], again[1], share):
        return selected, pad
    readings = [(ratios[best + 2], ratios[1], ms[best + 2], ms[0]), (again[2], again[1], ms_again[2], ms_again[0])]
    ratio, int8_ratio, int8_ms, fp32_ms = max(readings)  # the slower reading decides what is reported
    report.latency_ms, report.latency_ratio = {"quantized": int8_ms, "fp32": fp32_ms}, ratio
    chosen, _, what = variants[best]
    note = (f"{what}: the model took {ratio:.2f}x fp32's time ({int8_ms:.3f} vs {fp32_ms:.3f} ms), "
            f"{ratio / int8_ratio:.2f}x the all-int8 time{accuracy}")
    for name in sorted(selected - chosen, key=order.index):
        report.kept_float.append(FloatNode(name, plan.candidates[name].node.op_type, LATENCY, note))
    return chosen, False


def _variant_pays(variant: float, all_int8: float, share: float) -> bool:
    """A variant of the first layers takes at most ``share`` of the all-int8 model's time (FLOAT_PREFIX_BELOW:
    clearly faster; FLOAT_PREFIX_AS_FAST: as fast) and still pays against fp32 itself (both ratios are to
    fp32's time in the same timing)."""
    return variant <= share * all_int8 and variant <= PAYS_BELOW


def _more_accurate_as_fast(job: _Job, all_int8: bytes, variants: Sequence[tuple[set[str], bytes, str]],
                           ratios: Sequence[float]) -> tuple[int | None, str]:
    """(index, how its error compares) of the most accurate variant as fast as the all-int8 model, when its
    output error is at most FLOAT_PREFIX_ERROR of the all-int8 model's; (None, "") otherwise.

    An int8 first layer that saves no time should not cost accuracy: ViT-base's patch-embedding conv (0.7 % of
    its MACs) ran as fast in float (2.776x against 2.772x fp32's speed, paired) and the output SQNR on held-out
    images rose from 31.9 to 33.5 dB."""
    as_fast = [k for k in range(len(variants)) if _variant_pays(ratios[k + 2], ratios[1], FLOAT_PREFIX_AS_FAST)]
    if not as_fast:
        return None, ""
    base = job.model_error(all_int8)
    errors = {k: job.model_error(variants[k][1]) for k in as_fast}
    best = min(as_fast, key=errors.__getitem__)
    if errors[best] > FLOAT_PREFIX_ERROR * base:
        return None, ""
    return best, f", output error {errors[best]:.3g} against {base:.3g}"


def _activation_errors(fp32: bytes, quantized: bytes, inserted: Inserted, feeds) -> list[LayerError]:
    """SQNR of every quantized activation in the quantized model (DequantizeLinear output) vs fp32."""
    if not inserted.activations or not feeds:
        return []
    names = list(inserted.activations)
    dq_names = [inserted.activations[n][0] for n in names]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for ref, got in zip(run_exposed(onnx.load_from_string(fp32), names, feeds),
                        run_exposed(onnx.load_from_string(quantized), dq_names, feeds), strict=True):
        for name, dq in zip(names, dq_names, strict=True):
            r = np.asarray(ref[name], np.float64)
            signal[name] += float(np.vdot(r, r))
            q = np.asarray(got[dq])[tuple(slice(0, n) for n in r.shape)]  # without channels align.py padded
            noise[name] += float(np.sum((r - q) ** 2))
    rows = []
    for name in names:
        dq, cand, qp = inserted.activations[name]
        node, op = (cand.node.name, cand.node.op_type) if cand is not None else ("", "")
        sqnr = 10 * math.log10(max(signal[name], 1e-30) / noise[name]) if noise[name] > 0 else math.inf
        rows.append(LayerError(name, node, op, "activation", sqnr, float(qp.scale), str(qp.dtype)))
    return rows

