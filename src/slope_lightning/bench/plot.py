"""A PNG bar chart of one ratio column of a benchmark table, with the machine in the footnote.

matplotlib is optional (``pip install -e ".[bench]"``): this module imports it only inside
:func:`bar_chart`, through the ``Figure`` API (Agg canvas, no pyplot global state), so that
importing the benchmarks never needs it.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any

from slope_lightning.utils import machine_footnote

logger = logging.getLogger(__name__)

#: Characters per line of a bar label before it wraps.
LABEL_WIDTH = 48


def numeric_value(value: Any) -> float | None:
    """``value`` as a finite float, or None when it cannot be drawn as a bar (text, bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def drawable_rows(rows: list[dict[str, Any]], value_column: str) -> list[dict[str, Any]]:
    """The rows whose ``value_column`` can be drawn (see :func:`numeric_value`), in order."""
    return [row for row in rows if numeric_value(row.get(value_column)) is not None]


def label_columns(rows: list[dict[str, Any]], columns: list[str], value_column: str) -> list[str]:
    """The columns that say which row is which: text or integer columns, other than the plotted
    one, that differ between rows (a column equal in every row, e.g. the device, adds nothing).

    Float columns are measurements, not identifiers, so they never label a bar.
    """
    identifying = [
        column
        for column in columns
        if column != value_column
        and any(column in row for row in rows)
        and all(not isinstance(row.get(column), float) for row in rows)
    ]
    varying = [c for c in identifying if len({str(row.get(c, "")) for row in rows}) > 1]
    return varying or identifying


def bar_chart(
    path: Path,
    rows: list[dict[str, Any]],
    columns: list[str],
    value_column: str,
    title: str,
    info: dict[str, Any],
) -> Path | None:
    """Draw ``value_column`` of ``rows`` as horizontal bars with a reference line at 1.0.

    Each bar is labelled by the identifying columns (see :func:`label_columns`); rows whose
    value is missing, non-numeric or not finite are skipped. Returns the PNG path, or None
    (with a warning) when no row has a value to draw.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    drawn = drawable_rows(rows, value_column)
    skipped = len(rows) - len(drawn)
    if skipped:
        logger.info("plot %s: skipped %d rows without a numeric %r", path, skipped, value_column)
    if not drawn:
        logger.warning("plot %s: no row has a numeric %r; no PNG written", path, value_column)
        return None
    names = label_columns(drawn, columns, value_column)
    # Long labels (e.g. the CPU memory "measure" text) wrap, so the bars keep their width.
    labels = [
        textwrap.fill(" | ".join(str(row.get(c, "")) for c in names), LABEL_WIDTH) for row in drawn
    ]
    values = [numeric_value(row[value_column]) or 0.0 for row in drawn]

    # One bar per row, top to bottom in table order; the figure grows with the label lines.
    lines = sum(label.count("\n") + 1 for label in labels)
    figure = Figure(figsize=(9.0, 1.6 + 0.25 * lines + 0.2 * len(drawn)), layout="constrained")
    axes = figure.add_subplot()
    positions = list(range(len(drawn)))
    bars = axes.barh(positions, values, color="tab:blue", height=0.6)
    axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    axes.axvline(1.0, color="black", linestyle="--", linewidth=1.0)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0.0, max([1.0, *values]) * 1.15)  # room for the value labels
    axes.set_xlabel(f"{value_column} (dashed line: 1.0)")
    axes.set_title(title, fontsize=10)
    # supxlabel, not figure.text: the constrained layout keeps room for it below the axes.
    figure.supxlabel(machine_footnote(info), x=0.01, ha="left", fontsize=7, color="dimgray")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
