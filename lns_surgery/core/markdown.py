"""Markdown for what lns-surgery writes for people to read: the depth report's summary.md, model cards,
the demo's summary.md and the studies' summaries. One way to write a figure and a table, so the same
figure reads the same wherever it appears."""

from __future__ import annotations

import math

MISSING = "–"  # a figure that was not measured


def number(value) -> str:
    """A figure for a table cell or a sentence: integers with thousands separators, other numbers to
    four significant digits, ``MISSING`` for None; anything else as ``str`` gives it."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)  # text, and inf / nan as Python writes them


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table; cells that are not text are written with ``number``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else number(cell) for cell in row) + " |" for row in rows]
    return lines
