"""The verification report: a dataclass, its JSON form, and its rendering for the CLI."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from graphopt.verify.bisect import Divergence
from graphopt.verify.compare import OutputDiff, Tolerance

_VERDICT_STYLE = {
    "match": "green",
    "float_noise": "cyan",
    "mismatch": "bold red",
    "shape_mismatch": "bold red",
    "missing": "bold red",
}

_COLUMNS = ("output", "verdict", "dtype", "shape", "max abs", "max rel", "err/rms", "rtol / atol / noise")


@dataclass
class VerifyReport:
    """The outcome of :func:`graphopt.verify.verify_models`.

    ``ok`` is true when every output's verdict is ``match`` or ``float_noise``
    and the candidate ran. ``divergence`` is the first diverging node found by
    bisection (None when all is well, bisection was off, or no shared value
    differs). ``seed`` is None when the caller supplied the inputs. ``error``
    says why the candidate could not be loaded or run.
    """

    ok: bool
    outputs: list[OutputDiff]
    divergence: Divergence | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-serializable dict (non-finite floats become "inf", "-inf", "nan")."""
        return _json_safe(dataclasses.asdict(self))

    def summary(self) -> str:
        """Plain-text summary, one line per output."""
        lines = [f"verification {'OK' if self.ok else 'FAILED'} ({_inputs_line(self)})"]
        for out in self.outputs:
            lines.append(
                f"  {out.name}: {out.verdict}  max_abs={_fmt(out.max_abs)} max_rel={_fmt(out.max_rel)} "
                f"err/rms={_fmt(out.scaled_error)}" + (f"  ({out.detail})" if out.detail and out.ok else "")
            )
        lines.extend(f"  {line}" for line in _footer(self))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __rich__(self) -> Table | Text:
        return render_report(self)


def render_report(report: VerifyReport) -> Table | Text:
    """A rich table of the per-output verdicts, with the divergence and notes as its caption; just the
    verdict and the error where nothing was compared (a candidate onnxruntime cannot load)."""
    title = Text("verification OK", "bold green") if report.ok else Text("verification FAILED", "bold red")
    if not report.outputs:
        return Text("\n").join([title, *map(Text, _footer(report))])
    table = Table(title=title, caption="\n".join(_footer(report)) or None, caption_justify="left")
    for column in _COLUMNS:
        table.add_column(
            column,
            justify="right" if column.startswith(("max", "err")) else "left",
            no_wrap=column in ("verdict", "shape"),
        )
    for out in report.outputs:
        tol = out.tolerance_used
        tol_text = _tolerance_text(tol)
        table.add_row(
            out.name,
            Text(out.verdict, style=_VERDICT_STYLE.get(out.verdict, "")),
            out.dtype or "-",
            "-" if out.shape is None else str(out.shape),
            _fmt(out.max_abs),
            _fmt(out.max_rel),
            _fmt(out.scaled_error),
            tol_text,
        )
    return table


def _tolerance_text(tol: Tolerance | None) -> str:
    if tol is None:
        return "-"
    if tol == Tolerance(0.0, 0.0, 0.0):
        return "exact"
    return f"{tol.rtol:g} / {tol.atol:g} / {tol.noise:.2g}"


def _footer(report: VerifyReport) -> list[str]:
    lines = []
    if report.error:
        lines.append(f"error: {report.error}")
    for out in report.outputs:
        if not out.ok and out.detail:
            lines.append(f"{out.name}: {out.detail}")
    if report.divergence is not None:
        lines.append(f"first divergence: {describe_divergence(report.divergence)}")
    lines.extend(f"note: {note}" for note in report.notes)
    return lines


def describe_divergence(div: Divergence) -> str:
    """One line naming the diverging node and value, for people."""
    text = f"node {div.node!r} ({div.op_type}) output {div.value!r}: {div.verdict}"
    if div.max_abs is not None:
        text += f", max abs {_fmt(div.max_abs)}, max rel {_fmt(div.max_rel)}"
    same = (div.candidate_node, div.candidate_op_type) == (div.node, div.op_type)
    if div.candidate_node is not None and not same:
        text += f"; produced in the candidate by {div.candidate_node!r} ({div.candidate_op_type})"
    return text + f" [{div.compared} shared values compared]"


def _inputs_line(report: VerifyReport) -> str:
    inputs = ", ".join(
        f"{name}{shape} {report.input_dtypes.get(name, '')}".rstrip()
        for name, shape in report.input_shapes.items()
    )
    source = "given inputs" if report.seed is None else f"generated inputs, seed {report.seed}"
    return f"{source}: {inputs}" if inputs else source


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
