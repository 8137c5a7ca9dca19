"""The study's report, from the finished runs' markers alone: a table, the LR sweep and the loss
curves, as ``<name>.md``, ``<name>.json``, ``<name>-lr.png`` and ``<name>-curves.png``.

How the numbers are made:

* A run's number is its export's validation perplexity (see
  :mod:`~slope_lightning.study.evaluate`); a run stopped by a non-finite loss counts as
  infinite perplexity at its learning rate.
* Per method and learning rate: mean ± sample standard deviation over seeds. The best
  learning rate is the one of lowest mean validation loss (mean log-perplexity) among those
  where every seed finished; a best lr on the edge of its grid is a warning (the optimum
  may lie outside).
* Ratios to the baseline method compare best against best: the ratio of mean perplexities,
  and the mean ± std of the per-seed ratios (runs with one seed share their initialisation
  seed and data order, so the per-seed ratio is paired).
* The paired training-loss difference is the mean over the last 10% of logged steps of
  (method − baseline) training loss, per seed, then mean ± std over seeds: every pair saw
  the same batches, so this is a low-noise comparison of the whole run, not of one number.
* A run of fewer than 20 tokens per parameter is labelled *early training*: the numbers
  compare methods at that budget, not their final quality.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slope_lightning.study.config import FORMAT, StudyConfig, format_lr
from slope_lightning.study.selection import best_learning_rates, run_value, sweep_loss
from slope_lightning.utils import atomic_write, machine_footnote

logger = logging.getLogger(__name__)

#: Below this many training tokens per parameter a study is "early training" (a
#: compute-optimal budget is about 20, Hoffmann et al. 2022).
EARLY_TRAINING_TOKENS_PER_PARAMETER = 20.0
#: The share of a run's last logged training steps the paired loss difference averages.
PAIRED_TAIL = 0.1


# ---------------------------------------------------------------------------- numbers


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value; the mean is inf when any value
    is: a diverged seed makes its learning rate diverged)."""
    if not values:
        return math.nan, math.nan
    if any(math.isinf(v) for v in values):
        return math.inf, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def _tail_mean_difference(
    run: dict[str, Any], base: dict[str, Any], tag: str = "train/loss"
) -> float | None:
    """Mean of run − base over the steps both logged in the last :data:`PAIRED_TAIL` of the
    run, or None when they share no step there."""
    a = {step: value for step, value in run.get("curves", {}).get(tag, [])}
    b = {step: value for step, value in base.get("curves", {}).get(tag, [])}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    first = common[-1] - PAIRED_TAIL * common[-1]
    tail = [step for step in common if step >= first]
    return statistics.fmean(a[step] - b[step] for step in tail)


def summarize(
    study: StudyConfig, results: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Any]:
    """Everything the report shows, as plain values (what ``<name>.json`` holds)."""
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        by_key.setdefault((result["method"], float(result["lr"])), []).append(result)
    warnings: list[str] = []
    best = best_learning_rates(study, results)
    losses = sweep_loss(study, results)

    sweep: list[dict[str, Any]] = []
    for method in study.methods:
        if not method.swept:
            continue
        for lr in method.lrs:
            runs = [r for r in by_key.get((method.name, lr), []) if r["seed"] in study.sweep_seeds]
            ppl_mean, ppl_std = _mean_std([run_value(r) for r in runs])
            sweep.append(
                {
                    "method": method.name,
                    "lr": lr,
                    "seeds": len(runs),
                    "diverged": sum(r["status"] == "diverged" for r in runs),
                    "val_ppl": ppl_mean,
                    "val_ppl_std": ppl_std,
                    "val_loss": losses[method.name].get(lr, math.nan),
                    "best": lr == best.get(method.name),
                }
            )
        chosen = best.get(method.name)
        if chosen is None:
            warnings.append(f"{method.name}: its sweep has not finished (or every lr diverged)")
            continue
        if len(method.lrs) > 1 and chosen in (method.lrs[0], method.lrs[-1]):
            edge = "lowest" if chosen == method.lrs[0] else "highest"
            warnings.append(
                f"{method.name}: the best learning rate {format_lr(chosen)} is the {edge} of "
                f"its grid {[format_lr(lr) for lr in method.lrs]}; the optimum may lie outside"
            )
        if len(method.lrs) < 5:
            warnings.append(
                f"{method.name}: a grid of {len(method.lrs)} learning rates (a fair sweep has "
                "at least 5 on a log scale)"
            )

    def chosen_lr(name: str) -> float | None:
        method = study.method(name)
        return best.get(name if method.swept else str(method.lr_from))

    def runs_at_best(name: str) -> dict[int, dict[str, Any]]:
        lr = chosen_lr(name)
        return {r["seed"]: r for r in by_key.get((name, lr), [])} if lr is not None else {}

    baseline = study.baseline_method.name
    base_runs = runs_at_best(baseline)
    base_ppl = _mean_std([run_value(r) for r in base_runs.values()])[0] if base_runs else math.nan
    table: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for method in study.methods:
        reference = method.compare_to or baseline
        row: dict[str, Any] = {
            "method": method.name,
            "label": method.title,
            "group": method.group,
            "reference": reference,
            "best_lr": chosen_lr(method.name),
            "lr_from": method.lr_from,
        }
        runs = sorted(runs_at_best(method.name).values(), key=lambda r: r["seed"])
        if not runs:
            row["seeds"] = 0
            table.append(row)
            continue
        ref_runs = runs_at_best(reference)
        ppl, ppl_std = _mean_std([run_value(r) for r in runs])
        paired = [
            run_value(r) / run_value(ref_runs[r["seed"]]) for r in runs if r["seed"] in ref_runs
        ]
        deltas = [
            d
            for r in runs
            if r["seed"] in ref_runs
            for d in [_tail_mean_difference(r, ref_runs[r["seed"]])]
            if d is not None
        ]
        sources = sorted(
            {name for r in runs for name in (r.get("eval") or {}).get("per_source", {})}
        )
        per_source = {
            name: _mean_std([r["eval"]["per_source"][name]["ppl"] for r in runs if r.get("eval")])
            for name in sources
        }
        before = sorted(
            {t for r in runs for t in r.get("logged", {}) if t.startswith("pretrained/")}
        )
        run_tokens = {r.get("tokens") for r in runs}
        run_parameters = {(r.get("eval") or {}).get("parameters") for r in runs}
        row.update(
            {
                "seeds": len(runs),
                "seed_list": [r["seed"] for r in runs],
                "per_seed_ppl": {str(r["seed"]): run_value(r) for r in runs},
                "val_ppl": ppl,
                "val_ppl_std": ppl_std,
                "vs_baseline": ppl / base_ppl if base_ppl else math.nan,
                "paired_ratio": _mean_std(paired)[0] if paired else math.nan,
                "paired_ratio_std": _mean_std(paired)[1] if paired else math.nan,
                "train_loss_delta": _mean_std(deltas)[0] if deltas else math.nan,
                "train_loss_delta_std": _mean_std(deltas)[1] if deltas else math.nan,
                "per_source_ppl": {name: list(value) for name, value in per_source.items()},
                "before_training": {
                    tag: list(_mean_std([r["logged"][tag] for r in runs if tag in r["logged"]]))
                    for tag in before
                },
                "tokens": run_tokens.pop() if len(run_tokens) == 1 else None,
                "parameters": run_parameters.pop() if len(run_parameters) == 1 else None,
                "wall_s": statistics.fmean(r["wall_s"] for r in runs),
                "evaluated_windows": (runs[0].get("eval") or {}).get("windows"),
                "of_windows": (runs[0].get("eval") or {}).get("of_windows"),
            }
        )
        table.append(row)
        curves[method.name] = _mean_curves(runs)

    all_tokens = {r.get("tokens") for r in results}
    if len(all_tokens) > 1:
        warnings.append(
            "the runs did not all train on the same number of tokens: "
            f"{sorted(map(str, all_tokens))}"
        )
    tokens: int | None = next(iter(all_tokens)) if len(all_tokens) == 1 else None
    parameters: int | None = next(
        (t["parameters"] for t in table if t.get("parameters") and t["method"] == baseline),
        next((t["parameters"] for t in table if t.get("parameters")), None),
    )
    tokens_per_parameter = tokens / parameters if tokens and parameters else None
    early = (
        tokens_per_parameter is not None
        and tokens_per_parameter < EARLY_TRAINING_TOKENS_PER_PARAMETER
    )
    resumed = [r for r in results if r.get("resumed")]
    if resumed:
        warnings.append(
            f"{len(resumed)} run(s) were resumed; their wall time counts the last attempt only"
        )
    return {
        "format": FORMAT,
        "name": study.name,
        "description": study.description,
        "info": info,
        "complete": len(results) == study.planned_count(),
        "runs_planned": study.planned_count(),
        "runs_finished": len(results),
        "runs_diverged": sum(r["status"] == "diverged" for r in results),
        "baseline": baseline,
        "tokens_per_run": tokens,
        "parameters": parameters,
        "tokens_per_parameter": tokens_per_parameter,
        "early_training": early,
        "study": {
            "base_config": study.base_config,
            "seeds": list(study.seeds),
            "sweep_seeds": list(study.sweep_seeds),
            "callbacks": list(study.callbacks or []),
            "common": list(study.common),
            "runs_dir": study.runs_dir,
            "eval_windows": study.eval_windows,
            "methods": {
                m.name: {
                    "label": m.title,
                    "lrs": list(m.lrs),
                    "lr_from": m.lr_from,
                    "args": list(m.args),
                    "callbacks": list(m.callbacks) if m.callbacks is not None else None,
                    "seeds": list(study.seeds_of(m)),
                    "group": m.group,
                    "config": m.config,
                }
                for m in study.methods
            },
        },
        "table": table,
        "sweep": sweep,
        "curves": curves,
        "warnings": warnings,
    }


def _mean_curves(runs: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """``tag -> [[step, mean over runs]]`` of the steps every run logged (train/loss, val/ppl)."""
    out = {}
    for tag in ("train/loss", "val/ppl"):
        series = [dict((s, v) for s, v in r.get("curves", {}).get(tag, [])) for r in runs]
        if not series or not all(series):
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        out[tag] = [[step, statistics.fmean(s[step] for s in series)] for step in steps]
    return out


# ---------------------------------------------------------------------------- markdown


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "diverged" if math.isinf(mean) else "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _table(rows: list[dict[str, Any]], baseline: str, sources: list[str]) -> list[str]:
    """A markdown table of method rows (each at its best learning rate)."""
    header = [
        "method",
        "lr",
        "val ppl (mean ± std)",
        f"vs {baseline}",
        "paired ratio to reference",
        "train-loss Δ vs reference (last 10%)",
        *[f"{s} ppl" for s in sources],
        "seeds",
        "wall s / run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if not row.get("seeds"):
            lines.append(f"| {row['label']} | – | not run yet |" + " |" * (len(header) - 3))
            continue
        lr = format_lr(row["best_lr"]) + (f" (of {row['lr_from']})" if row.get("lr_from") else "")
        reference = row.get("reference", baseline)
        same = reference == row["method"]
        cells = [
            row["label"],
            lr,
            _pm(row["val_ppl"], row["val_ppl_std"]),
            f"{row['vs_baseline']:.3f}",
            "–"
            if same
            else f"{_pm(row['paired_ratio'], row['paired_ratio_std'], 3)} ({reference})",
            "–" if same else _pm(row["train_loss_delta"], row["train_loss_delta_std"], 3),
            *[
                _pm(*row["per_source_ppl"][s]) if s in row["per_source_ppl"] else "–"
                for s in sources
            ],
            str(row["seeds"]),
            f"{row['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict[str, Any]) -> str:
    """The report as markdown (the same content as the JSON, for reading)."""
    name = summary["name"]
    baseline = summary["baseline"]
    lines = [f"# Quality study: {name}", ""]
    if summary["description"]:
        lines += [summary["description"].strip(), ""]
    tokens, per_parameter = summary["tokens_per_run"], summary["tokens_per_parameter"]
    if summary["early_training"]:
        lines += [
            f"**Early training.** Each run trains on {tokens:,} tokens, "
            f"{per_parameter:.2g} tokens per parameter (a compute-optimal budget is about "
            f"{EARLY_TRAINING_TOKENS_PER_PARAMETER:.0f}): these numbers compare the methods at "
            "this budget, not their final quality.",
            "",
        ]
    if not summary["complete"]:
        lines += [
            f"**Incomplete:** {summary['runs_finished']} of {summary['runs_planned']} runs "
            "finished; the tables show those.",
            "",
        ]
    info = summary["info"]
    lines += [
        f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}"
        for key, value in info.items()
    ]
    lines += [
        f"- runs: {summary['runs_finished']} of {summary['runs_planned']} finished, "
        f"{summary['runs_diverged']} diverged; seeds {summary['study']['seeds']}; per-run "
        f"TensorBoard logs under `{summary['study']['runs_dir']}`",
        f"- tokens per run: {tokens:,}" if tokens else "- tokens per run: (differ)",
        f"- model parameters (dense count, embeddings included): {summary['parameters']:,}"
        if summary["parameters"]
        else "- model parameters: unknown",
        "",
        "## Each method at its best learning rate",
        "",
    ]
    sources = sorted({s for row in summary["table"] for s in row.get("per_source_ppl", {})})
    methods = [row for row in summary["table"] if row.get("group", "method") == "method"]
    ablations = [row for row in summary["table"] if row.get("group") == "ablation"]
    lines += _table(methods, baseline, sources)
    if ablations:
        lines += [
            "",
            "## Ablations",
            "",
            "Each ablation changes one thing of its reference method and runs at the "
            "reference's best learning rate, paired seed by seed with it.",
            "",
        ]
        lines += _table(ablations, baseline, sources)
    seeded = [row for row in methods if len(row.get("per_seed_ppl", {})) > 1]
    if seeded:
        seeds = sorted({seed for row in seeded for seed in row["per_seed_ppl"]}, key=int)
        lines += [
            "",
            "## Per seed",
            "",
            "Validation perplexity of every seed at the method's best learning rate (a seed is "
            "one initialisation and one data order, shared by every method): a mean over "
            "three seeds can hide one outlier.",
            "",
            "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
            "|---|" + "---|" * len(seeds),
        ]
        for row in seeded:
            cells = [
                f"{row['per_seed_ppl'][seed]:.1f}" if seed in row["per_seed_ppl"] else "–"
                for seed in seeds
            ]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    before = [row for row in summary["table"] if row.get("before_training")]
    if before:
        tags = sorted({tag for row in before for tag in row["before_training"]})
        lines += [
            "",
            "## Before training",
            "",
            "Logged by the run before its first step (e.g. `InitFromPretrained`: the "
            "pretrained model and its one-shot pruned copy), on the validation windows the "
            "final evaluation uses when the study's `eval_windows` matches its `eval_batches`.",
            "",
            "| method | " + " | ".join(tags) + " | after training (val ppl) |",
            "|---|" + "---|" * (len(tags) + 1),
        ]
        for row in before:
            cells = [
                _pm(*row["before_training"][tag]) if tag in row["before_training"] else "–"
                for tag in tags
            ]
            after = _pm(row["val_ppl"], row["val_ppl_std"])
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {after} |")
    evaluated = next((row for row in summary["table"] if row.get("evaluated_windows")), None)
    if evaluated is not None:
        lines += [
            "",
            "Validation perplexity of each run's exported model on "
            f"{evaluated['evaluated_windows']} of the {evaluated['of_windows']} validation "
            "windows (the split's fixed stratified order: every source in proportion), "
            "evaluated by the study, not the training loop's sample.",
        ]
    lines += ["", "## Learning-rate sweep", ""]
    lines += [
        "| method | lr | val ppl (mean ± std) | val loss | seeds | diverged | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["sweep"]:
        cells = [
            row["method"],
            format_lr(row["lr"]),
            _pm(row["val_ppl"], row["val_ppl_std"]),
            f"{row['val_loss']:.4f}",
            str(row["seeds"]),
            str(row["diverged"]),
            "**best**" if row["best"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    lines += [
        "",
        "## Figures",
        "",
        f"![LR sweep]({name}-lr.png)",
        "",
        f"![Loss curves at each method's best lr]({name}-curves.png)",
        "",
        "## Methods",
        "",
    ]
    for method, spec in summary["study"]["methods"].items():
        args = " ".join(spec["args"]) or "(the base config as it is)"
        callbacks = ", ".join(
            c["class_path"].rsplit(".", 1)[-1]
            + "("
            + ", ".join(f"{k}={v}" for k, v in (c.get("init_args") or {}).items())
            + ")"
            for c in (spec.get("callbacks") or [])
        )
        grid = (
            f"lrs {[format_lr(lr) for lr in spec['lrs']]}"
            if not spec.get("lr_from")
            else f"at the best lr of `{spec['lr_from']}`"
        )
        extra = f"; callbacks {callbacks}" if callbacks else ""
        lines.append(
            f"- **{spec['label']}** (`{method}`): `{args}`{extra}; {grid}; seeds {spec['seeds']}"
        )
    lines += [
        "",
        f"Every run: `{' '.join(summary['study']['common'])}` on "
        f"`{summary['study']['base_config']}`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figures


def plot_sweep(path: Path, summary: dict[str, Any]) -> Path:
    """Validation perplexity against learning rate, one line per method (mean, ± std bars,
    the best marked by a star)."""
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
        for r in rows:
            if r["best"]:
                axes.plot(
                    [r["lr"]], [r["val_ppl"]], marker="*", markersize=14, color=line[0].get_color()
                )
    axes.set_xscale("log")
    axes.set_xlabel("peak learning rate")
    axes.set_ylabel("validation perplexity (mean ± std over seeds)")
    axes.set_title(f"{summary['name']}: learning-rate sweep (★ best per method)", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.supxlabel(
        machine_footnote(summary["info"]), x=0.01, ha="left", fontsize=7, color="dimgray"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_curves(path: Path, summary: dict[str, Any]) -> Path:
    """Training loss and validation perplexity against step at each method's best lr (mean
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
    figure.suptitle(f"{summary['name']}: each method at its best learning rate", fontsize=10)
    figure.supxlabel(
        machine_footnote(summary["info"]), x=0.01, ha="left", fontsize=7, color="dimgray"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def write_report(
    study: StudyConfig, results: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (with matplotlib) the two PNGs under the
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
    for path in paths.values():
        logger.info("wrote %s", path)
    return paths
