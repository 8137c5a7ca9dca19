"""The study's report, from the finished runs' markers alone: a table, the LR sweep and the loss
curves, as ``<name>.json`` (:mod:`~slope_lightning.study.summary`: how the numbers are made),
``<name>.md`` (:mod:`~slope_lightning.study.markdown`), ``<name>-lr.png`` and
``<name>-curves.png``, ``<name>-gap.png`` (:mod:`~slope_lightning.study.figures`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from slope_lightning.study.config import StudyConfig
from slope_lightning.study.figures import plot_curves, plot_gap, plot_sweep
from slope_lightning.study.markdown import render_markdown
from slope_lightning.study.summary import summarize
from slope_lightning.utils import atomic_write

__all__ = ["render_markdown", "summarize", "write_report"]

logger = logging.getLogger(__name__)


def write_report(
    study: StudyConfig, results: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (with matplotlib) the PNGs under the
    study's ``report_dir``; return their paths by kind."""
    out = Path(study.report_dir)
    summary = summarize(study, results, info)
    paths = {"json": out / f"{study.name}.json", "markdown": out / f"{study.name}.md"}
    atomic_write(paths["json"], json.dumps(summary, indent=1, default=str, allow_nan=True) + "\n")
    atomic_write(paths["markdown"], render_markdown(summary))
    try:
        import matplotlib  # noqa: F401  (optional: the "bench" extra)
    except ImportError:
        logger.warning('matplotlib is not installed: no PNG (pip install -e ".[bench]")')
        return paths
    if results:
        paths["sweep"] = plot_sweep(out / f"{study.name}-lr.png", summary)
        paths["curves"] = plot_curves(out / f"{study.name}-curves.png", summary)
    if summary["gap"]:
        paths["gap"] = plot_gap(out / f"{study.name}-gap.png", summary)
    for path in paths.values():
        logger.info("wrote %s", path)
    return paths
