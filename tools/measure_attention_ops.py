"""Which fused operators make onnxruntime's CPU provider fastest on transformer blocks (issue 5).

The fusion passes in ``passes/fusion/{norm,gelu,attention}.py`` pick their target ops from these
numbers: one small graph per candidate form of the same computation (LayerNorm, RMSNorm, GELU,
SiLU, multi-head attention with its projections, QKV merging, the FFN's inner width padded off 4 KiB
rows), at BERT-base shapes, each run in onnxruntime at the given optimization levels, all variants
interleaved with ``tools/bench``'s loop (order rotated each round, each variant timed warm in a block of
back-to-back calls), paired medians.
End-to-end model latency (original, peers, graphopt) is ``tools/bench_fusion.py``'s job.

    python tools/measure_attention_ops.py ops --family attention --batch 1 8 --runs 30

Sessions: 2 intra-op threads, 1 inter-op thread, ``session.intra_op.allow_spinning = 0`` (several
sessions are alive at once; idle spinning threads of one slowed another 7-13x here).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `tools` and `graphopt` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphopt.timing import LatencyStats, measure_interleaved, raise_failures  # noqa: E402
from tools.bench.pairing import paired_ratio  # noqa: E402

log = logging.getLogger("measure_attention_ops")

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
F = TensorProto.FLOAT
MS = "com.microsoft"
Case = tuple[onnx.ModelProto, dict[str, np.ndarray]]


# ------------------------------------------------------------------------------------------ timing


def session(model: onnx.ModelProto | str, level: str, threads: int = 2) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


@dataclass
class Timing:
    """Medians over rounds: wall ms, CPU ms, and the ratios to the baseline measured in the same round
    (robust to the machine's speed drifting during the measurement)."""

    wall_ms: float
    cpu_ms: float
    wall_ratio: float
    cpu_ratio: float
    wall_min_ms: float  # the fastest run: the least disturbed by other processes


def summarize(stats: Mapping[str, LatencyStats], baseline: str) -> dict[str, Timing]:
    raise_failures(stats)
    base = stats[baseline]
    return {name: Timing(st.median_ms, st.cpu_median_ms, paired_ratio(st.samples_ms, base.samples_ms),
                         paired_ratio(st.cpu_samples_ms, base.cpu_samples_ms), st.min_ms)
            for name, st in stats.items()}


def measure_cases(cases: Mapping[str, Case], levels: list[str], runs: int, warmup: int,
                  check: str | None = None) -> dict[str, dict[str, Timing]]:
    """Latency of every case at every level (all interleaved); ratios are to the first case at the same level.

    With ``check``, every case's output is compared with that case's (logged)."""
    calls: dict[str, Callable[[], object]] = {}
    reference = None
    for name, (model, feeds) in cases.items():
        for level in levels:
            sess = session(model, level)
            calls[f"{name}\t{level}"] = (lambda s=sess, f=feeds: s.run(None, f))
        if check is not None:
            got = session(model, "disable").run(None, feeds)[0]
            if name == check:
                reference = got
            elif reference is not None:
                log.info("%s: max |diff| vs %s = %.2e", name, check, float(np.abs(got - reference).max()))
    samples = measure_interleaved(calls, runs=runs, warmup=warmup)  # rotated rounds, warm blocks
    first = next(iter(cases))
    table: dict[str, dict[str, Timing]] = {}
    for level in levels:
        level_samples = {k.split("\t")[0]: v for k, v in samples.items() if k.endswith(f"\t{level}")}
        for name, timing in summarize(level_samples, first).items():
            table.setdefault(name, {})[level] = timing
    return table


def print_table(title: str, table: Mapping[str, Mapping[str, Timing]]) -> None:
    levels = list(next(iter(table.values())))
    baseline = next(iter(table))
    head = " | ".join(f"{lv} wall ms | {lv} min ms | {lv} CPU ms | {lv} wall x | {lv} CPU x" for lv in levels)
    print(f"\n{title} (x: ratio to {baseline} in the same round, median)\n| variant | {head} |")
    print("|---|" + "---:|" * 5 * len(levels))
    for name, row in table.items():
        cells = " | ".join(f"{row[lv].wall_ms:.2f} | {row[lv].wall_min_ms:.2f} | {row[lv].cpu_ms:.2f} | "
                           f"{row[lv].wall_ratio:.3f} | {row[lv].cpu_ratio:.3f}" for lv in levels)
        print(f"| {name} | {cells} |", flush=True)


# ---------------------------------------------------------------------------------- graph building


class G:
    """A tiny graph builder: ``g.op("MatMul", x, w)`` returns the output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def const(self, array: np.ndarray) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs) -> str | list[str]:
        self.count += 1
        outs = [f"{op_type.lower()}{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def model(self, inputs: list[onnx.ValueInfoProto], out: str, opset: int = 18) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "y"
        for node in self.nodes:
            for i, name in enumerate(node.input):
                if name == out:
                    node.input[i] = "y"
        graph = helper.make_graph(self.nodes, "g", inputs, [helper.make_tensor_value_info("y", F, None)], self.inits)
        imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
        return helper.make_model(graph, opset_imports=imports, ir_version=10)


def _x(batch: int, seq: int, hidden: int, rng: np.random.Generator, name: str = "x"):
    return (helper.make_tensor_value_info(name, F, ["batch", "seq", hidden]),
            rng.standard_normal((batch, seq, hidden)).astype(np.float32))


# ------------------------------------------------------------------------------------ norm, GELU, SiLU


def norm_cases(batch: int, seq: int, hidden: int = 768) -> dict[str, Case]:
    """LayerNorm / RMSNorm, decomposed vs fused forms, each preceded by the residual Add it follows in BERT."""
    rng = np.random.default_rng(0)
    xi, xv = _x(batch, seq, hidden, rng)
    ri, rv = _x(batch, seq, hidden, rng, "r")
    feeds = {"x": xv, "r": rv}
    gamma, beta = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)
    cases: dict[str, Case] = {}

    def build(kind: str, opset: int = 18) -> onnx.ModelProto:
        g = G()
        s = g.op("Add", "x", "r")
        if kind == "ln_decomposed":
            axes = g.const(np.array([-1]))
            d = g.op("Sub", s, g.op("ReduceMean", s, axes))
            v = g.op("ReduceMean", g.op("Pow", d, g.const(np.float32(2))), axes)
            n = g.op("Div", d, g.op("Sqrt", g.op("Add", v, g.const(np.float32(1e-12)))))
            y = g.op("Add", g.op("Mul", n, g.const(gamma)), g.const(beta))
        elif kind == "ln":
            y = g.op("LayerNormalization", s, g.const(gamma), g.const(beta), axis=-1, epsilon=1e-12)
        elif kind == "skip_ln":
            y = g.op("SkipLayerNormalization", "x", "r", g.const(gamma), g.const(beta), domain=MS, epsilon=1e-12)
        elif kind == "rms_decomposed":
            axes = g.const(np.array([-1]))
            v = g.op("ReduceMean", g.op("Pow", s, g.const(np.float32(2))), axes)
            n = g.op("Mul", s, g.op("Reciprocal", g.op("Sqrt", g.op("Add", v, g.const(np.float32(1e-6))))))
            y = g.op("Mul", n, g.const(gamma))
        elif kind == "rms23":
            y = g.op("RMSNormalization", s, g.const(gamma), axis=-1, epsilon=1e-6)
        elif kind == "simplified_ln":
            y = g.op("SimplifiedLayerNormalization", s, g.const(gamma), axis=-1, epsilon=1e-6)
        elif kind == "skip_simplified_ln":
            y = g.op("SkipSimplifiedLayerNormalization", "x", "r", g.const(gamma), domain=MS, epsilon=1e-6)
        else:
            raise ValueError(kind)
        return g.model([xi, ri], y, opset)

    for kind in ("ln_decomposed", "ln", "skip_ln", "rms_decomposed", "simplified_ln", "skip_simplified_ln"):
        cases[kind] = (build(kind), feeds)
    cases["rms23"] = (build("rms23", 23), feeds)
    return cases


def gelu_cases(batch: int, seq: int, hidden: int = 3072) -> dict[str, Case]:
    """GELU after the bias Add of BERT's intermediate dense layer: decomposed vs fused forms."""
    rng = np.random.default_rng(0)
    xi, xv = _x(batch, seq, hidden, rng)
    bias = g_bias = rng.standard_normal(hidden).astype(np.float32)
    feeds = {"x": xv}

    def build(kind: str, opset: int = 18) -> onnx.ModelProto:
        g = G()
        b = g.const(g_bias)
        h = g.op("Add", "x", b) if kind not in ("bias_gelu", "fast_gelu_bias") else None
        if kind == "erf_decomposed":
            e = g.op("Erf", g.op("Div", h, g.const(np.float32(np.sqrt(2)))))
            y = g.op("Mul", g.op("Mul", h, g.op("Add", e, g.const(np.float32(1)))), g.const(np.float32(0.5)))
        elif kind == "tanh_decomposed":
            cube = g.op("Mul", g.op("Pow", h, g.const(np.float32(3))), g.const(np.float32(0.044715)))
            inner = g.op("Mul", g.op("Add", h, cube), g.const(np.float32(np.sqrt(2 / np.pi))))
            y = g.op("Mul", g.op("Mul", h, g.const(np.float32(0.5))), g.op("Add", g.op("Tanh", inner),
                                                                          g.const(np.float32(1))))
        elif kind == "gelu20":
            y = g.op("Gelu", h)
        elif kind == "gelu20_tanh":
            y = g.op("Gelu", h, approximate="tanh")
        elif kind == "ms_gelu":
            y = g.op("Gelu", h, domain=MS)
        elif kind == "bias_gelu":
            y = g.op("BiasGelu", "x", b, domain=MS)
        elif kind == "fast_gelu":
            y = g.op("FastGelu", h, domain=MS)
        elif kind == "fast_gelu_bias":
            y = g.op("FastGelu", "x", b, domain=MS)
        elif kind == "silu_decomposed":
            y = g.op("Mul", h, g.op("Sigmoid", h))
        elif kind == "quick_gelu":
            y = g.op("QuickGelu", h, domain=MS, alpha=1.0)
        elif kind == "swish24":
            y = g.op("Swish", h)
        else:
            raise ValueError(kind)
        return g.model([xi], y, opset)

    del bias
    kinds = {"erf_decomposed": 18, "gelu20": 20, "ms_gelu": 18, "bias_gelu": 18, "tanh_decomposed": 18,
             "gelu20_tanh": 20, "fast_gelu": 18, "fast_gelu_bias": 18, "silu_decomposed": 18, "quick_gelu": 18,
             "swish24": 24}
    return {k: (build(k, v), feeds) for k, v in kinds.items()}


# ------------------------------------------------------------------------------------------ attention


def attention_cases(batch: int, seq: int, mask: str, hidden: int = 768, heads: int = 12) -> dict[str, Case]:
    """Self-attention with its Q/K/V projections (no output projection), written each way.

    ``mask``: "none" (ViT), "pad" (BERT: a 0/1 ``attention_mask`` input) or "causal" (GPT-2).
    """
    rng = np.random.default_rng(0)
    head = hidden // heads
    xi, xv = _x(batch, seq, hidden, rng)
    w = [(rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32) for _ in range(3)]
    b = [(rng.standard_normal(hidden) * 0.1).astype(np.float32) for _ in range(3)]
    inputs = [xi]
    feeds = {"x": xv}
    if mask == "pad":
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
        m = np.ones((batch, seq), np.int64)
        m[1:, seq // 2:] = 0
        feeds["attention_mask"] = m
    scale = 1 / np.sqrt(head)

    def additive(g: G, full: bool) -> str:
        """The mask as an additive float bias: [B,1,1,S] (or [B,1,S,S] when ``full``), or causal [1,1,S,S]."""
        if mask == "causal":
            tri = np.triu(np.full((seq, seq), -3.4028234663852886e38, np.float32), 1)
            return g.const(tri.reshape(1, 1, seq, seq))
        f = g.op("Cast", "attention_mask", to=F)
        bias = g.op("Mul", g.op("Sub", g.const(np.float32(1)), f), g.const(np.float32(-3.4028234663852886e38)))
        bias = g.op("Unsqueeze", bias, g.const(np.array([1, 2])))
        if full:
            bias = g.op("Expand", bias, g.op("Concat", g.op("Shape", "attention_mask", start=0, end=1),
                                             g.const(np.array([1, seq, seq])), axis=0))
        return bias

    def projections(g: G, with_bias: bool, merged: bool = False) -> list[str]:
        if merged:
            y = g.op("MatMul", "x", g.const(np.concatenate(w, axis=1)))
            if with_bias:
                y = g.op("Add", y, g.const(np.concatenate(b)))
            return g.op("Split", y, g.const(np.array([hidden] * 3)), outputs=3, axis=-1)
        outs = [g.op("MatMul", "x", g.const(wi)) for wi in w]
        return [g.op("Add", o, g.const(bi)) for o, bi in zip(outs, b, strict=True)] if with_bias else outs

    def unfused(merged: bool) -> onnx.ModelProto:
        g = G()
        q, k, v = projections(g, True, merged)
        shape4 = g.const(np.array([0, 0, heads, head]))
        qh = g.op("Transpose", g.op("Reshape", q, shape4), perm=[0, 2, 1, 3])
        kt = g.op("Transpose", g.op("Reshape", k, shape4), perm=[0, 2, 3, 1])
        vh = g.op("Transpose", g.op("Reshape", v, shape4), perm=[0, 2, 1, 3])
        s = g.op("Mul", g.op("MatMul", qh, kt), g.const(np.float32(scale)))
        if mask != "none":
            s = g.op("Add", s, additive(g, False))
        o = g.op("MatMul", g.op("Softmax", s, axis=-1), vh)
        y = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const(np.array([0, 0, hidden])))
        return g.model(inputs, y)

    def ms_attention(mask_form: str) -> onnx.ModelProto:
        g = G()
        ins = ["x", g.const(np.concatenate(w, axis=1)), g.const(np.concatenate(b))]
        attrs = {"num_heads": heads}
        if mask == "causal":
            attrs["unidirectional"] = 1
        elif mask == "pad" and mask_form == "index":
            ins.append(g.op("Cast", "attention_mask", to=TensorProto.INT32))
        elif mask == "pad":
            ins += ["", "", additive(g, True)]
        return g.model(inputs, g.op("Attention", *ins, domain=MS, **attrs))

    def mha(mask_form: str, merged: bool) -> onnx.ModelProto:
        g = G()
        q, k, v = projections(g, False, merged)
        ins = [q, k, v, g.const(np.concatenate(b))]
        if mask == "pad" and mask_form == "index":
            ins.append(g.op("Cast", "attention_mask", to=TensorProto.INT32))
        elif mask != "none":
            ins += ["", additive(g, True)]
        return g.model(inputs, g.op("MultiHeadAttention", *ins, domain=MS, num_heads=heads))

    def onnx_attention() -> onnx.ModelProto:
        g = G()
        q, k, v = projections(g, True)
        ins, attrs = [q, k, v], {"q_num_heads": heads, "kv_num_heads": heads}
        if mask == "causal":
            attrs["is_causal"] = 1
        elif mask == "pad":
            ins.append(additive(g, True))  # onnxruntime 1.32 does not broadcast attn_mask's query axis
        return g.model(inputs, g.op("Attention", *ins, **attrs), opset=23)

    cases = {"unfused": unfused(False), "unfused_qkv_merged": unfused(True), "ms_attention": ms_attention("index"),
             "mha": mha("index", False), "mha_qkv_merged": mha("index", True), "onnx_attention23": onnx_attention()}
    if mask != "none":
        cases["ms_attention_bias"] = ms_attention("bias")
        cases["mha_bias"] = mha("bias", False)
    if mask == "causal":
        del cases["ms_attention_bias"]
    return {name: (model, feeds) for name, model in cases.items()}


def ffn_cases(batch: int, seq: int, hidden: int = 768, width: int = 3072) -> dict[str, Case]:
    """BERT's FFN (MatMul, BiasGelu, MatMul) with its inner width as exported and padded by zero weights
    (``passes/fusion/stride.py``): the same outputs, the second GEMM reading rows of another length."""
    rng = np.random.default_rng(0)
    xi, xv = _x(batch, seq, hidden, rng)
    w1 = (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32)
    w2 = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32)

    def build(pad: int) -> onnx.ModelProto:
        g = G()
        h = g.op("MatMul", "x", g.const(np.pad(w1, [(0, 0), (0, pad)])))
        a = g.op("BiasGelu", h, g.const(np.pad(bias, (0, pad))), domain=MS)
        return g.model([xi], g.op("MatMul", a, g.const(np.pad(w2, [(0, pad), (0, 0)]))))

    return {f"ffn_{width}" + (f"_padded_{pad}" if pad else ""): (build(pad), {"x": xv}) for pad in (0, 16, 32, 64)}


# ---------------------------------------------------------------------------------------------- main


def run_ops(args: argparse.Namespace) -> None:
    for batch in args.batch:
        families: dict[str, dict[str, Case]] = {}
        if args.family in ("norm", "all"):
            families["norm"] = norm_cases(batch, args.seq)
        if args.family in ("gelu", "all"):
            families["gelu"] = gelu_cases(batch, args.seq)
        if args.family in ("ffn", "all"):
            families["ffn"] = ffn_cases(batch, args.seq)
        if args.family in ("attention", "all"):
            for mask in args.masks:
                families[f"attention mask={mask}"] = attention_cases(batch, args.seq, mask)
        for title, cases in families.items():
            table = measure_cases(cases, args.levels, args.runs, args.warmup, check=next(iter(cases)))
            print_table(f"{title}, batch {batch}, seq {args.seq}", table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ops = sub.add_parser("ops", help="candidate fused ops on BERT-base shapes")
    ops.add_argument("--family", choices=["norm", "gelu", "ffn", "attention", "all"], default="all")
    ops.add_argument("--masks", nargs="+", default=["none", "pad", "causal"])
    ops.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ops.add_argument("--seq", type=int, default=128)
    ops.add_argument("--runs", type=int, default=30)
    ops.add_argument("--warmup", type=int, default=5)
    ops.add_argument("--levels", nargs="+", default=["all"], choices=list(LEVELS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_ops(args)


if __name__ == "__main__":
    main()
