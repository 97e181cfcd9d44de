"""The measured per-op table (``int8_ops.json``, written by ``tools/measure_int8_ops.py`` on this machine).

An op *kind* refines an op type where onnxruntime's int8 speed differs: dense, 1x1 and depthwise
convolutions are different kernels. The table says which kinds onnxruntime fuses into int8 kernels and
how fast each ran alone; alone is not in context (an int8 MaxPool ran 25x slower than fp32 in NCHW, but
between int8 convs onnxruntime runs it in NHWC at full speed; int8 depthwise convs ran 0.74x alone and
made MobileNetV2 faster in context), so the speed-ups only order which kinds the whole-model latency
check gives up first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from graphopt.ir import Node

TABLE_PATH = Path(__file__).with_name("int8_ops.json")
# Kinds the static QDQ insertion knows how to quantize (onnxruntime has an int8 kernel for each).
STATIC_KINDS = ("Conv", "Conv1x1", "ConvDepthwise", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool",
                "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu")
WEIGHT_KINDS = ("Conv", "Conv1x1", "ConvDepthwise", "Gemm", "MatMul")  # kinds with a constant weight input


@functools.cache
def load_table(path: str = str(TABLE_PATH)) -> dict:
    """{kind: {"fused": bool, "speedup": float, "pays": bool, ...}} (empty when the file is missing)."""
    try:
        return json.loads(Path(path).read_text())["ops"]
    except (OSError, ValueError, KeyError):
        return {}


def op_kind(node: Node) -> str | None:
    """The table kind of ``node``, or None when graphopt does not quantize its op type."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        shape = weight.shape if weight is not None else None
        if not shape or len(shape) != 4:
            return "Conv" if shape and len(shape) == 3 else None
        group = node.attr("group", 1)
        if group > 1 and shape[1] == 1:
            return "ConvDepthwise"
        return "Conv1x1" if tuple(shape[2:]) == (1, 1) and group == 1 else "Conv"
    return node.op_type if node.op_type in STATIC_KINDS else None


def fused_kinds(table: dict | None = None) -> set[str]:
    """Kinds onnxruntime turned into an int8 kernel here (whether that paid in isolation or not)."""
    table = load_table() if table is None else table
    if not table:  # no measurements: the kinds onnxruntime fuses on every x86 CPU (U8S8 GEMM-based kernels)
        return {"Conv", "Conv1x1", "Gemm"}
    return {k for k, v in table.items() if isinstance(v, dict) and v.get("fused")}


@functools.cache
def saturating_u8s8() -> bool:
    """True on x86 CPUs without VNNI: their U8S8 int8 GEMM sums u8 x s8 pairs in saturating int16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def speedup(kind: str, table: dict | None = None) -> float | None:
    entry = (load_table() if table is None else table).get(kind)
    return entry.get("speedup") if isinstance(entry, dict) else None
