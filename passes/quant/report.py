"""QuantReport: what was quantized, what stayed float and why, and the error it costs, as JSON and a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

# Why a node stayed in float (FloatNode.reason).
SENSITIVITY, LATENCY, UNSUPPORTED, EXCLUDED = "sensitivity", "latency", "unsupported", "excluded"
RANGES = "ranges"  # a Concat of far-apart ranges, a sum with a mask, an activation too narrow for a scale


@dataclass
class LayerError:
    """Error of one quantized tensor against its fp32 value on the calibration data."""

    tensor: str
    node: str  # the quantized node reading (or producing) it
    op_type: str
    kind: str  # "activation" or "weight"
    sqnr_db: float
    scale: float  # the (largest) scale used
    dtype: str


@dataclass
class FloatNode:
    """A node left in float and why (SENSITIVITY, LATENCY, UNSUPPORTED, EXCLUDED or RANGES)."""

    node: str
    op_type: str
    reason: str
    detail: str = ""


@dataclass
class QuantReport:
    """What ``quantize`` did. Errors are against the fp32 model after graphopt's (lossless) fusions, on the
    first ``eval_samples`` calibration samples; ``layers`` has one row per quantized weight and activation."""

    mode: str
    method: str
    activation_type: str
    per_channel: bool
    samples: int
    quantized_nodes: int = 0
    layers: list[LayerError] = field(default_factory=list)
    kept_float: list[FloatNode] = field(default_factory=list)
    # Output error vs fp32 on the calibration data: {"cosine": mean cosine, "rel_l2": ..., "sqnr_db": ...,
    # "metric": the budget metric's value}.
    output_error: dict[str, float] = field(default_factory=dict)
    max_error: float | None = None
    budget_met: bool | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)  # node -> error gain when kept float
    latency_ms: dict[str, float] = field(default_factory=dict)  # {"fp32": .., "quantized": ..} medians
    latency_ratio: float | None = None  # median per-round quantized/fp32 time of the model returned
    latency_batch: int | None = None  # the batch those times are for; None: one calibration sample
    size_bytes: dict[str, int] = field(default_factory=dict)  # {"fp32": .., "quantized": ..} initializer bytes
    timings_s: dict[str, float] = field(default_factory=dict)  # step -> seconds
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=_jsonable, **{"indent": 2, **kwargs})

    def __rich__(self) -> Group:
        return render(self)


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def render(report: QuantReport, max_rows: int = 60) -> Group:
    """Rich tables: per-tensor SQNR (worst first), nodes kept in float, and the summary."""
    parts: list[Any] = []
    layers = Table("tensor", "node", "op", "kind", "dtype", "SQNR (dB)",
                   title="quantized tensors vs fp32 (worst first)")
    for row in sorted(report.layers, key=lambda r: r.sqnr_db)[:max_rows]:
        layers.add_row(row.tensor, row.node, row.op_type, row.kind, row.dtype, f"{row.sqnr_db:.1f}")
    if len(report.layers) > max_rows:
        layers.caption = f"{len(report.layers) - max_rows} more in --json"
    parts.append(layers)
    if report.kept_float:
        kept = Table("node", "op", "reason", "detail", title="kept in float")
        for row in report.kept_float:
            kept.add_row(row.node, row.op_type, row.reason, row.detail)
        parts.append(kept)
    summary = Table(show_header=False, title="summary")
    summary.add_row("mode", f"{report.mode} ({report.activation_type} activations, "
                            f"{'per-channel' if report.per_channel else 'per-tensor'} weights, {report.method})")
    summary.add_row("quantized nodes", str(report.quantized_nodes))
    summary.add_row("calibration samples", str(report.samples))
    for key, value in report.output_error.items():
        summary.add_row(f"output {key}", f"{value:.5g}")
    if report.max_error is not None:
        summary.add_row("budget", f"{report.max_error:g} ({'met' if report.budget_met else 'NOT met'})")
    if report.latency_ms:
        text = ", ".join(f"{k} {v:.3f} ms" for k, v in report.latency_ms.items())
        ratio = report.latency_ratio
        at = f", batch {report.latency_batch}" if report.latency_batch else ""
        summary.add_row(f"latency (ORT CPU{at})", text + (f"  speed-up {1 / ratio:.2f}x (paired)" if ratio else ""))
    if report.size_bytes:
        summary.add_row("weights", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report.size_bytes.items()))
    for key, value in report.timings_s.items():
        summary.add_row(f"time: {key}", f"{value:.2f} s")
    parts.append(summary)
    parts.extend(Text(f"note: {n}") for n in report.notes)
    return Group(*parts)
