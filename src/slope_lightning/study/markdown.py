"""The study's report as markdown (``<name>.md``): :func:`render_markdown` of a
:func:`~slope_lightning.study.summary.summarize` summary."""

from __future__ import annotations

import math
from typing import Any

from slope_lightning.study.config import format_lr
from slope_lightning.study.summary import EARLY_TRAINING_TOKENS_PER_PARAMETER


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "diverged" if math.isinf(mean) else "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


#: How the tables name each split.
SPLIT_NAMES = {"test": "test", "validation": "val"}


def _table(rows: list[dict[str, Any]], baseline: str, sources: list[str], split: str) -> list[str]:
    """A markdown table of method rows (each at its chosen learning rate), on ``split``."""
    name = SPLIT_NAMES[split]
    header = [
        "method",
        "lr",
        f"{name} ppl (mean ± std)",
        f"vs {baseline}",
        "paired ratio to reference",
        "train-loss Δ vs reference (last 10%)",
        *[f"{s} {name} ppl" for s in sources],
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
            _pm(row["ppl"], row["ppl_std"]),
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
    split = summary.get("split", "validation")
    if split == "test":
        lines += [
            "**Test split.** Every table of results is on the held-out test split, which chose "
            "nothing; the validation split chose each method's learning rate and appears only "
            "in the sweep and refine tables.",
            "",
        ]
    else:
        lines += [f"**Validation numbers.** {summary.get('split_note', '')}".rstrip(), ""]
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
        f"## Each method at its chosen learning rate ({split} split)",
        "",
    ]
    sources = sorted({s for row in summary["table"] for s in row.get("per_source_ppl", {})})
    methods = [row for row in summary["table"] if row.get("group", "method") == "method"]
    ablations = [row for row in summary["table"] if row.get("group") == "ablation"]
    lines += _table(methods, baseline, sources, split)
    if ablations:
        lines += [
            "",
            "## Ablations",
            "",
            "Each ablation changes one thing of its reference method and runs at the "
            "chosen learning rate of the method it names, paired seed by seed with it.",
            "",
        ]
        lines += _table(ablations, baseline, sources, split)
    seeded = [row for row in methods if len(row.get("per_seed_ppl", {})) > 1]
    if seeded:
        seeds = sorted({seed for row in seeded for seed in row["per_seed_ppl"]}, key=int)
        lines += [
            "",
            "## Per seed",
            "",
            f"{split.capitalize()} perplexity of every seed at the method's chosen learning "
            "rate (a seed is one initialisation and one data order, shared by every method): a "
            "mean over three seeds can hide one outlier.",
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
    lines += _gap(summary)
    before = [row for row in summary["table"] if row.get("before_training")]
    if before:
        tags = sorted({tag for row in before for tag in row["before_training"]})
        test_header = " after training (test ppl) |" if split == "test" else ""
        lines += [
            "",
            "## Before training",
            "",
            "Logged by the run before its first step (e.g. `InitFromPretrained`: the "
            "pretrained model and its one-shot pruned copy), on the validation windows the "
            "final evaluation uses when the study's `eval_windows` matches its `eval_batches`: "
            "so the after-training column beside them is on validation too.",
            "",
            "| method | " + " | ".join(tags) + " | after training (val ppl) |" + test_header,
            "|---|" + "---|" * (len(tags) + 1 + bool(test_header)),
        ]
        for row in before:
            cells = [
                _pm(*row["before_training"][tag]) if tag in row["before_training"] else "–"
                for tag in tags
            ]
            after = [_pm(row["val_ppl"], row["val_ppl_std"])]  # the windows of the before
            if test_header:
                after.append(_pm(row["ppl"], row["ppl_std"]))
            lines.append(f"| {row['label']} | " + " | ".join([*cells, *after]) + " |")
    evaluated = next((row for row in summary["table"] if row.get("evaluated_windows")), None)
    if evaluated is not None:
        lines += [
            "",
            f"{split.capitalize()} perplexity of each run's exported model on "
            f"{evaluated['evaluated_windows']} of the {evaluated['of_windows']} {split} "
            "windows (the split's fixed stratified order: every source in proportion), "
            "evaluated by the study, not the training loop's sample.",
        ]
    lines += _selection(summary)
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    lines += [
        "",
        "## Figures",
        "",
        f"![LR sweep]({name}-lr.png)",
        "",
        f"![Loss curves at each method's chosen lr]({name}-curves.png)",
        "",
        *_gap_figure(summary),
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
            else f"at the chosen lr of `{spec['lr_from']}`"
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


def _gap_figure(summary: dict[str, Any]) -> list[str]:
    if not summary.get("gap"):
        return []
    return [
        f"![Each method over {summary['baseline']} along training]({summary['name']}-gap.png)",
        "",
    ]


def _gap(summary: dict[str, Any]) -> list[str]:
    """The table of each method's perplexity over the baseline's along training."""
    gap: dict[str, list[list[float]]] = summary.get("gap") or {}
    if not gap:
        return []
    labels = {row["method"]: row["label"] for row in summary["table"]}
    baseline = labels.get(summary["baseline"], summary["baseline"])
    points = sorted({point[0] for series in gap.values() for point in series})
    lines = [
        "",
        "## The gap along training",
        "",
        f"Validation perplexity of each method over {baseline}'s at every validation point of "
        "the runs (each at its chosen learning rate; the training loop's validation sample, "
        "the same windows for every run), paired seed by seed: mean ± std over seeds. Below 1 "
        f"is better than {baseline}. Whether the gap opens, closes or stays as training goes "
        "on is read down a column. Methods that prune the baseline's model after training "
        "are left out: until they prune, their curve is the baseline's.",
        "",
        "| tokens seen | " + " | ".join(labels.get(name, name) for name in gap) + " |",
        "|---|" + "---|" * len(gap),
    ]
    for tokens in points:
        cells = []
        for series in gap.values():
            found = next((p for p in series if p[0] == tokens), None)
            cells.append(_pm(found[1], found[2], digits=3) if found else "–")
        lines.append(f"| {tokens:,.0f} | " + " | ".join(cells) + " |")
    return lines


def _selection(summary: dict[str, Any]) -> list[str]:
    """The learning-rate choice on validation: the sweep, the refine and the choice."""
    seeds = summary["study"]["sweep_seeds"]
    lines = [
        "",
        "## Learning rate: sweep, refine, choice (validation split)",
        "",
        f"The sweep runs each method's grid on seed(s) {seeds}; the refine runs the sweep's "
        "best lr and its better neighbour on the grid on every seed; the choice is the refine "
        "lr of the lowest mean validation loss over every seed. A refine run on a sweep seed "
        "is that sweep run.",
        "",
        "### Sweep",
        "",
        "| method | lr | val ppl (mean ± std) | val loss | seeds | diverged | sweep best "
        "| refine |",
        "|---|---|---|---|---|---|---|---|",
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
            "yes" if row.get("refine") else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    refine = summary.get("refine", [])
    if refine:
        lines += [
            "",
            "### Refine and choice",
            "",
            "| method | lr | val ppl over every seed (mean ± std) | val loss | seeds | diverged "
            "| choice |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in refine:
            cells = [
                row["method"],
                format_lr(row["lr"]) + (" (sweep best)" if row["sweep_best"] else ""),
                _pm(row["val_ppl"], row["val_ppl_std"]),
                f"{row['val_loss']:.4f}",
                f"{row['seeds']} of {row['of_seeds']}",
                str(row["diverged"]),
                "**chosen**" if row["chosen"] else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines
