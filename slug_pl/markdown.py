"""Markdown for reports: percentages and tables, written the same way by every report section
(the run record, the methods' and the targets' sections)."""

from __future__ import annotations

from collections.abc import Sequence


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal ("–" for None)."""
    return "–" if value is None else f"{100 * value:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]
