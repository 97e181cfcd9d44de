"""Markdown tables for benchmark reports."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align_right_from: int = 1) -> str:
    """A GitHub markdown table; columns from ``align_right_from`` on are right-aligned (numbers)."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    rule = ["-" * max(3, w - 1) + (":" if i >= align_right_from else "-") for i, w in enumerate(widths)]
    lines = [cells[0], rule, *cells[1:]]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")
