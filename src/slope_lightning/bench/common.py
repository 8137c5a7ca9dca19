"""What every benchmark records: the machine, the versions, the date and the exact command."""

from __future__ import annotations

import json
import logging
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def machine_info() -> dict[str, Any]:
    """Where the numbers come from; a GPU number is only a GPU number if a GPU is named here."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m slope_lightning.bench " + shlex.join(sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (CUDA synchronised around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    out_dir: Path,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    columns: list[str],
    plot_column: str | None = None,
) -> str:
    """Write ``<name>.json`` and ``<name>.md`` to ``out_dir``; return the markdown text.

    With ``plot_column`` (a ratio or speedup column), also draw ``<name>.png``: one bar per
    row and a reference line at 1.0. matplotlib is optional; without it the PNG is skipped
    with a warning and the JSON and markdown are still written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {key}: {value}" for key, value in info.items())
    text = f"# {name}\n\n{header}\n\n{markdown_table(rows, columns)}\n"
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    logger.info("wrote %s and %s", out_dir / f"{name}.md", out_dir / f"{name}.json")
    if plot_column is not None:
        try:
            import matplotlib  # noqa: F401  (optional dependency: the "bench" extra)
        except ImportError:
            logger.warning(
                "matplotlib is not installed: skipped %s (install it with "
                '`pip install -e ".[bench]"`)',
                out_dir / f"{name}.png",
            )
        else:
            from slope_lightning.bench.plot import bar_chart

            png = bar_chart(
                out_dir / f"{name}.png", rows, columns, plot_column, f"{name}: {plot_column}", info
            )
            if png is not None:
                logger.info("wrote %s", png)
    return text
