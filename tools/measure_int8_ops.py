"""Which ops onnxruntime's CPU provider really runs in int8, and whether int8 pays on THIS machine.

For every candidate op, a chain of ``--depth`` copies at a typical CNN/transformer size is built twice:
fp32 (``x -> op -> op ...``) and QDQ (``x -> Q -> DQ -> op -> Q -> DQ -> op ...``, uint8 activations, int8
per-channel weights, int32 bias), each run in onnxruntime (ORT_ENABLE_ALL, 2 intra-op threads, no spinning),
interleaved (rotated rounds, warm blocks), medians. The QDQ graph that onnxruntime optimized is saved and
read back: an op counts as *fused* when no float version of it is left (its QDQ group became an int8 kernel:
QLinearConv, QGemm, QLinearAdd, an int8 MaxPool, ...). ``speedup`` = fp32 median / int8 median. Dynamic
quantization forms of MatMul (DynamicQuantizeMatMul vs DynamicQuantizeLinear + MatMulInteger) are measured
the same way.

    python tools/measure_int8_ops.py                 # writes passes/quant/int8_ops.json
    python tools/measure_int8_ops.py --runs 50 --out /tmp/ops.json

``graphopt.passes.quant`` reads the JSON (``passes/quant/optable.py``): static mode quantizes by default the
op kinds that were fused, and its latency check gives up first the kinds whose ``speedup`` was lowest.
``pays`` (at least ``PAYS`` times faster alone) is recorded for reading; alone is not in context.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `tools` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphopt.timing import measure_interleaved, raise_failures  # noqa: E402

F, U8, I8 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8
OUT = Path(__file__).resolve().parents[1] / "passes" / "quant" / "int8_ops.json"
PAYS = 1.05  # an int8 kernel must beat fp32 by this much to be used by default (noise margin)
ACT_SCALE, ACT_ZP = 0.05, 128  # uint8 activations covering about [-6.4, 6.35]


class Chain:
    """Builds the fp32 and the QDQ chain side by side."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.shape = shape
        self.fp, self.q, self.inits, self.qinits = [], [], [], []
        self.cur_f = self.cur_q = "x"
        self.qinits += [numpy_helper.from_array(np.array(ACT_SCALE, np.float32), "s"),
                        numpy_helper.from_array(np.array(ACT_ZP, np.uint8), "zp")]
        self.n = 0
        self._qdq("x")

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def _qdq(self, value: str) -> None:
        q, dq = self.name("q"), self.name("dq")
        self.q += [helper.make_node("QuantizeLinear", [value, "s", "zp"], [q]),
                   helper.make_node("DequantizeLinear", [q, "s", "zp"], [dq])]
        self.cur_q = dq

    def weight(self, array: np.ndarray, axis: int | None) -> tuple[str, str]:
        """(float name, dequantized int8 name) of a constant."""
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        reduce_axes = tuple(i for i in range(array.ndim) if i != axis) if axis is not None else None
        scale = np.maximum(np.abs(array).max(axis=reduce_axes), 1e-8) / 127
        shaped = scale.reshape([-1 if i == axis else 1 for i in range(array.ndim)]) if axis is not None else scale
        qw = np.clip(np.round(array / shaped), -127, 127).astype(np.int8)
        self.qinits += [numpy_helper.from_array(qw, name + "_q"),
                        numpy_helper.from_array(scale.astype(np.float32), name + "_s"),
                        numpy_helper.from_array(np.zeros_like(scale, np.int8), name + "_z")]
        attrs = {"axis": axis} if axis is not None else {}
        self.q.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_dq"],
                                       **attrs))
        return name, name + "_dq"

    def bias(self, array: np.ndarray, w_scale_name: str) -> tuple[str, str]:
        name = self.name("b")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        w_scale = numpy_helper.to_array(next(t for t in self.qinits if t.name == w_scale_name))
        scale = (ACT_SCALE * w_scale).astype(np.float32)
        self.qinits += [numpy_helper.from_array(np.round(array / scale).astype(np.int32), name + "_q"),
                        numpy_helper.from_array(scale, name + "_s"),
                        numpy_helper.from_array(np.zeros(scale.shape, np.int32), name + "_z")]
        self.q.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s", name + "_z"], [name + "_dq"],
                                       axis=0))
        return name, name + "_dq"

    def op(self, op_type: str, consts: list[tuple[np.ndarray, int | None]] = (), bias: np.ndarray | None = None,
           self_inputs: int = 1, **attrs) -> None:
        """Append one op reading the running value (``self_inputs`` times) and constants."""
        f_in, q_in = [self.cur_f] * self_inputs, [self.cur_q] * self_inputs
        for array, axis in consts:
            fname, qname = self.weight(array, axis)
            f_in.append(fname)
            q_in.append(qname)
        if bias is not None:
            fname, qname = self.bias(bias, q_in[-1].replace("_dq", "_s"))
            f_in.append(fname)
            q_in.append(qname)
        out_f, out_q = self.name("f"), self.name("y")
        self.fp.append(helper.make_node(op_type, f_in, [out_f], **attrs))
        self.q.append(helper.make_node(op_type, q_in, [out_q], **attrs))
        self.cur_f = out_f
        self._qdq(out_q)

    def models(self, opset: int = 17) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        x = helper.make_tensor_value_info("x", F, list(self.shape))
        out = []
        for nodes, inits, last in ((self.fp, self.inits, self.cur_f),
                                   (self.q, self.inits + self.qinits, self.cur_q)):
            used = {i for n in nodes for i in n.input}
            graph = helper.make_graph(nodes, "chain", [x], [helper.make_tensor_value_info(last, F, None)],
                                      [t for t in inits if t.name in used])
            out.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
        return out[0], out[1]


def conv_weight(rng, cout: int, cin: int, k: int) -> np.ndarray:
    return (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)


def cases(depth: int) -> dict[str, Callable[[], Chain]]:
    """op kind -> chain builder; kinds are what ``graphopt.passes.quant`` looks up (see ``op_kind``)."""
    def conv(cin: int, k: int, group: int = 1) -> Chain:
        c = Chain((1, cin, 28, 28))
        for _ in range(depth):
            c.op("Conv", [(conv_weight(c.rng, cin, cin // group, k), 0)], bias=c.rng.standard_normal(cin) * 0.1,
                 pads=[k // 2] * 4, group=group)
        return c

    def unary(op_type: str, shape=(1, 64, 28, 28), **attrs) -> Callable[[], Chain]:
        def build() -> Chain:
            c = Chain(shape)
            for _ in range(depth):
                c.op(op_type, **attrs)
            return c
        return build

    def binary(op_type: str) -> Callable[[], Chain]:
        def build() -> Chain:
            c = Chain((1, 64, 28, 28))
            for _ in range(depth):
                c.op(op_type, self_inputs=2)
            return c
        return build

    def gemm() -> Chain:
        c = Chain((1, 1024))
        for _ in range(depth):
            c.op("Gemm", [(c.rng.standard_normal((1024, 1024)).astype(np.float32) / 32, 0)],
                 bias=c.rng.standard_normal(1024) * 0.1, transB=1)
        return c

    def matmul() -> Chain:
        c = Chain((1, 128, 384))
        for _ in range(depth):
            c.op("MatMul", [(c.rng.standard_normal((384, 384)).astype(np.float32) / 20, 1)])
        return c

    return {
        "Conv": lambda: conv(64, 3), "Conv1x1": lambda: conv(128, 1), "ConvDepthwise": lambda: conv(96, 3, 96),
        "Gemm": gemm, "MatMul": matmul,
        "Add": binary("Add"), "Mul": binary("Mul"),
        "Concat": unary("Concat", axis=1),  # one-input Concat: a copy, enough to see the int8 path
        "MaxPool": unary("MaxPool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        "AveragePool": unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        "GlobalAveragePool": unary("GlobalAveragePool", shape=(1, 512, 14, 14)),
        "Sigmoid": unary("Sigmoid"), "LeakyRelu": unary("LeakyRelu"),
        "Softmax": unary("Softmax", shape=(1, 12, 128, 128), axis=-1),
        "Transpose": unary("Transpose", perm=[0, 1, 3, 2]),
    }


def dynamic_matmul_models(shape=(1, 128, 384), n=384, depth: int = 4, seed: int = 0):
    """fp32 MatMul chain, DynamicQuantizeMatMul chain, DynamicQuantizeLinear + MatMulInteger chain."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((shape[-1], n)).astype(np.float32) / 20 for _ in range(depth)]
    x = helper.make_tensor_value_info("x", F, list(shape))
    variants = {}
    for kind in ("fp32", "DynamicQuantizeMatMul", "MatMulInteger"):
        nodes, inits, cur = [], [], "x"
        for i, w in enumerate(ws):
            scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
            qw = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            out = f"y{i}"
            if kind == "fp32":
                inits.append(numpy_helper.from_array(w, f"w{i}"))
                nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [out]))
            else:
                inits += [numpy_helper.from_array(qw, f"qw{i}"), numpy_helper.from_array(scale, f"ws{i}"),
                          numpy_helper.from_array(np.zeros(n, np.int8), f"wz{i}")]
                if kind == "DynamicQuantizeMatMul":
                    nodes.append(helper.make_node(kind, [cur, f"qw{i}", f"ws{i}", f"wz{i}"], [out],
                                                  domain="com.microsoft"))
                else:
                    nodes += [helper.make_node("DynamicQuantizeLinear", [cur], [f"a{i}", f"as{i}", f"az{i}"]),
                              helper.make_node("MatMulInteger", [f"a{i}", f"qw{i}", f"az{i}", f"wz{i}"], [f"i{i}"]),
                              helper.make_node("Cast", [f"i{i}"], [f"c{i}"], to=F),
                              helper.make_node("Mul", [f"as{i}", f"ws{i}"], [f"m{i}"]),
                              helper.make_node("Mul", [f"c{i}", f"m{i}"], [out])]
            cur = out
        graph = helper.make_graph(nodes, kind, [x], [helper.make_tensor_value_info(cur, F, None)], inits)
        variants[kind] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)])
    return variants, {"x": rng.standard_normal(shape).astype(np.float32)}


def session(model: onnx.ModelProto, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict, runs: int) -> dict[str, float]:
    """Median ms per session, timed with ``tools/bench``'s loop (rotated rounds, warm blocks), so drift hits
    all sessions alike."""
    stats = measure_interleaved({k: (lambda s=sess: s.run(None, feeds)) for k, sess in sessions.items()},
                                runs=runs, warmup=3)
    raise_failures(stats)
    return {name: st.median_ms for name, st in stats.items()}


def float_ops_left(model: onnx.ModelProto, op_type: str) -> list[str]:
    """Op types in ORT's optimized graph: what the QDQ group became."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        session(model, path)
        return sorted({n.op_type for n in onnx.load(path).graph.node})


def measure(runs: int, depth: int) -> dict:
    table: dict = {}
    for kind, build in cases(depth).items():
        chain = build()
        fp, qdq = chain.models()
        feeds = {"x": np.random.default_rng(1).standard_normal(chain.shape).astype(np.float32)}
        optimized_ops = float_ops_left(qdq, kind)
        op_type = fp.graph.node[0].op_type
        fused = op_type not in optimized_ops or op_type in ("Concat", "MaxPool", "Transpose") and \
            "DequantizeLinear" not in optimized_ops[1:] and _only_boundary_qdq(qdq)
        ms = time_interleaved({"fp32": session(fp), "int8": session(qdq)}, feeds, runs)
        table[kind] = {"op_type": op_type, "fused": bool(fused), "ort_ops": optimized_ops, "fp32_ms": ms["fp32"],
                       "int8_ms": ms["int8"], "speedup": ms["fp32"] / ms["int8"]}
        table[kind]["pays"] = bool(fused and table[kind]["speedup"] >= PAYS)
        print(f"{kind:18s} fused={fused!s:5s} speedup={table[kind]['speedup']:.2f}  {optimized_ops}", flush=True)
    variants, feeds = dynamic_matmul_models()
    ms = time_interleaved({k: session(m) for k, m in variants.items()}, feeds, runs)
    table["dynamic:MatMul"] = {k: {"ms": v, "speedup": ms["fp32"] / v} for k, v in ms.items()}
    print("dynamic MatMul", {k: round(ms["fp32"] / v, 2) for k, v in ms.items()}, flush=True)
    return table


def _only_boundary_qdq(qdq: onnx.ModelProto) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        session(qdq, path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
    return ops.count("DequantizeLinear") <= 1 and ops.count("QuantizeLinear") <= 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    table = measure(args.runs, args.depth)
    meta = {"onnxruntime": ort.__version__, "machine": platform.machine(), "processor": _cpu_name(),
            "pays_threshold": PAYS, "runs": args.runs, "depth": args.depth}
    Path(args.out).write_text(json.dumps({"meta": meta, "ops": table}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" avx512_vnni" if "avx512_vnni" in flags else "") + \
                    (" avx_vnni" if " avx_vnni" in flags else "")
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
