"""The study's figures, drawn from a :func:`~slope_lightning.study.summary.summarize`
summary with matplotlib (optional: imported inside the functions): the learning-rate sweep and
refine on validation (``<name>-lr.png``) and the loss curves at each method's chosen learning
rate (``<name>-curves.png``) and each method over the baseline along training
(``<name>-gap.png``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from slope_lightning.study.config import format_lr
from slope_lightning.utils import machine_footnote


def plot_sweep(path: Path, summary: dict[str, Any]) -> Path:
    """Validation perplexity against learning rate, one line per method (the sweep: mean over
    the sweep seeds, ± std bars), its refine lrs as squares (mean over every seed) and the
    chosen lr marked by a star."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for method in summary["study"]["methods"]:
        rows = [
            r for r in summary["sweep"] if r["method"] == method and math.isfinite(r["val_ppl"])
        ]
        if not rows:
            continue
        label = summary["study"]["methods"][method]["label"]
        lrs = [r["lr"] for r in rows]
        line = axes.errorbar(
            lrs,
            [r["val_ppl"] for r in rows],
            yerr=[r["val_ppl_std"] if math.isfinite(r["val_ppl_std"]) else 0.0 for r in rows],
            marker="o",
            capsize=3,
            label=label,
        )
        color = line[0].get_color()
        for r in summary.get("refine", []):
            if r["method"] != method or not math.isfinite(r["val_ppl"]):
                continue
            marker = "*" if r["chosen"] else "s"
            axes.plot(
                [r["lr"]],
                [r["val_ppl"]],
                marker=marker,
                markersize=14 if r["chosen"] else 8,
                markerfacecolor=color if r["chosen"] else "none",
                color=color,
            )
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("validation perplexity (mean ± std over seeds)")
    axes.set_title(
        f"{summary['name']}: sweep (lines), refine on every seed (□), chosen lr (★)", fontsize=10
    )
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    return _save(figure, path, summary)


def plot_curves(path: Path, summary: dict[str, Any]) -> Path:
    """Training loss and validation perplexity against step at each method's chosen lr (mean
    over seeds)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(10.0, 4.2), layout="constrained")
    train_axes, val_axes = figure.subplots(1, 2)
    for row in summary["table"]:
        if row.get("group", "method") != "method":
            continue  # the ablations are in their table: one line per method stays readable
        curve = summary["curves"].get(row["method"], {})
        label = (
            f"{row['label']} (lr {format_lr(row['best_lr'])})"
            if row.get("best_lr")
            else row["label"]
        )
        if "train/loss" in curve:
            steps, values = zip(*curve["train/loss"], strict=True)
            train_axes.plot(steps, values, label=label, linewidth=1.2)
        if "val/ppl" in curve:
            steps, values = zip(*curve["val/ppl"], strict=True)
            val_axes.plot(steps, values, marker="o", label=label)
    train_axes.set_xlabel("step")
    train_axes.set_ylabel("training loss (mean over seeds)")
    train_axes.set_title("training loss", fontsize=10)
    val_axes.set_xlabel("step")
    val_axes.set_ylabel("validation perplexity (training loop's sample)")
    val_axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 276, not 2.76 x 10^2
    val_axes.yaxis.set_major_formatter(plain)
    val_axes.yaxis.set_minor_formatter(plain)
    val_axes.set_title("validation perplexity", fontsize=10)
    for axes in (train_axes, val_axes):
        axes.grid(True, alpha=0.3)
        if axes.get_lines():
            axes.legend(fontsize=8)
    figure.suptitle(f"{summary['name']}: each method at its chosen learning rate", fontsize=10)
    return _save(figure, path, summary)


def plot_gap(path: Path, summary: dict[str, Any]) -> Path:
    """Each method's validation perplexity over the baseline's against tokens seen (paired by
    seed: mean, ± std band), with the parity line at 1."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    labels = {row["method"]: row["label"] for row in summary["table"]}
    for name, points in summary["gap"].items():
        tokens = [p[0] for p in points]
        mean = [p[1] for p in points]
        std = [p[2] if math.isfinite(p[2]) else 0.0 for p in points]
        (line,) = axes.plot(tokens, mean, marker="o", label=labels.get(name, name))
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axes.fill_between(tokens, low, high, color=line.get_color(), alpha=0.15)
    axes.axhline(1.0, color="black", linewidth=0.8)
    baseline = labels.get(summary["baseline"], summary["baseline"])
    axes.set_xlabel("training tokens seen")
    axes.set_ylabel("validation perplexity ratio (paired by seed)")
    axes.set_title(f"{summary['name']}: each method over {baseline} along training", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path, summary)


def _save(figure: Any, path: Path, summary: dict[str, Any]) -> Path:
    """Name the machine in the figure's footnote and write it to ``path``."""
    figure.supxlabel(
        machine_footnote(summary["info"]), x=0.01, ha="left", fontsize=7, color="dimgray"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
