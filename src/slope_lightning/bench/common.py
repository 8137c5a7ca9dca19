"""How a benchmark's table reaches the disk: row by row, so that a suite stopped by a timeout
keeps every row it finished, beside what every benchmark records (the machine, the versions,
the date and the exact command: :func:`slope_lightning.utils.machine_info`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slope_lightning.utils import atomic_write

logger = logging.getLogger(__name__)

#: A benchmark row: column name -> value (str, int, float, bool or None).
Row = dict[str, Any]
#: Called with every finished row, as soon as it is finished (see :class:`ResultsTable`).
RowSink = Callable[[Row], None]


def default_device(device: str | torch.device | None) -> torch.device:
    """``device``, else CUDA when available: building and pruning billion-parameter models on
    the CPU takes minutes. Byte counts do not depend on the device."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def emit(rows: list[Row], row: Row, on_row: RowSink | None) -> None:
    """Keep ``row`` and hand it to ``on_row`` at once (a timeout then keeps it)."""
    rows.append(row)
    if on_row is not None:
        on_row(row)


def markdown_table(rows: list[Row], columns: list[str]) -> str:
    """A markdown table of ``columns``; floats with 3 decimals, missing cells empty."""

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(
    name: str, info: dict[str, Any], rows: list[Row], columns: list[str], complete: bool = True
) -> str:
    """The markdown file of one table: title, machine, the table, and a warning if the suite
    stopped before its last row (a timeout), so a partial table never reads as a full one."""
    header = "\n".join(f"- {key}: {value}" for key, value in info.items())
    text = f"# {name}\n\n{header}\n\n"
    if not complete:
        text += (
            f"**Incomplete:** the suite stopped after {len(rows)} rows (a timeout or an "
            "error); the rows below are the ones it finished.\n\n"
        )
    return text + markdown_table(rows, columns) + "\n"


def plot_table(path: Path, name: str, document: dict[str, Any]) -> Path | None:
    """Draw ``<name>.png`` from a results document (what :class:`ResultsTable` writes).

    matplotlib is optional: without it the PNG is skipped with a warning. Returns the PNG's
    path, or None when nothing was drawn (no plot column, no matplotlib, no numeric row).
    """
    column = document.get("plot_column")
    if column is None:
        return None
    try:
        import matplotlib  # noqa: F401  (optional dependency: the "bench" extra)
    except ImportError:
        logger.warning(
            'matplotlib is not installed: skipped %s (install it with `pip install -e ".[bench]"`)',
            path,
        )
        return None
    from slope_lightning.bench.plot import bar_chart

    rows, columns, info = document["rows"], document["columns"], document["info"]
    png = bar_chart(path, rows, columns, column, f"{name}: {column}", info)
    if png is not None:
        logger.info("wrote %s", png)
    return png


class ResultsTable:
    """One benchmark table on disk, ``<name>.json`` and ``<name>.md``, rewritten after every row.

    Each :meth:`add` rewrites both files through a temporary file and a rename
    (:func:`slope_lightning.utils.atomic_write`), so at any moment, and after a ``timeout``
    kills the process, they hold every finished row and parse. The JSON says whether the
    suite got to its end (``"complete"``) and carries the columns and the plot column, so
    the markdown and the PNG can be rendered again from it alone, on another machine
    (``python -m slope_lightning.bench unpack``). Rewriting, not appending, costs O(rows) per
    row: a few KiB for the largest table.

    Example:
        >>> table = ResultsTable("demo", out, info, ["method", "ms"], "ms")  # doctest: +SKIP
        >>> rows = suite_rows(..., on_row=table.add)  # doctest: +SKIP
        >>> print(table.close())  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        out_dir: Path,
        info: dict[str, Any],
        columns: list[str],
        plot_column: str | None = None,
    ) -> None:
        self.name = name
        self.out_dir = Path(out_dir)
        self.info = info
        self.columns = list(columns)
        self.plot_column = plot_column
        self.rows: list[Row] = []
        self.complete = False
        self._write()  # an empty table marks the suite as started

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    @property
    def markdown_path(self) -> Path:
        return self.out_dir / f"{self.name}.md"

    def document(self) -> dict[str, Any]:
        """What the JSON file holds."""
        return {
            "name": self.name,
            "info": self.info,
            "columns": self.columns,
            "plot_column": self.plot_column,
            "complete": self.complete,
            "rows": self.rows,
        }

    def markdown(self) -> str:
        return render_markdown(self.name, self.info, self.rows, self.columns, self.complete)

    def _write(self) -> None:
        atomic_write(self.json_path, json.dumps(self.document(), indent=2, default=str))
        atomic_write(self.markdown_path, self.markdown())

    def add(self, row: Row) -> None:
        """Record one finished row and write both files at once (a :data:`RowSink`)."""
        self.rows.append(row)
        self._write()

    def close(self, plot: bool = True) -> str:
        """Mark the table complete, write it, draw the PNG if ``plot``; return the markdown.

        ``plot=False`` is for the GPU machine, where time is short and only one archive comes
        back: the PNGs are drawn afterwards on a CPU from the JSON.
        """
        self.complete = True
        self._write()
        logger.info("wrote %s and %s", self.markdown_path, self.json_path)
        if plot:
            plot_table(self.out_dir / f"{self.name}.png", self.name, self.document())
        return self.markdown()


def write_results(
    name: str,
    out_dir: Path,
    info: dict[str, Any],
    rows: list[Row],
    columns: list[str],
    plot_column: str | None = None,
    plot: bool = True,
) -> str:
    """Write a finished table at once (``<name>.json``, ``<name>.md`` and, with ``plot_column``
    and ``plot``, ``<name>.png``); return the markdown text. For rows that are computed all
    together (e.g. ``runs``); a suite that measures row by row uses :class:`ResultsTable`."""
    table = ResultsTable(name, out_dir, info, columns, plot_column)
    for row in rows:
        table.rows.append(row)
    return table.close(plot=plot)
