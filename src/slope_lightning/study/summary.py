"""The numbers of the study's report (what ``<name>.json`` holds), from the finished runs'
markers alone: :func:`summarize`.

How the numbers are made:

* Validation chooses, the test split reports. A run's number is its export's perplexity on
  the held-out test split (see :mod:`~slope_lightning.study.evaluate`); a study whose runs
  have no test split (``data.test_fraction: 0``) reports the validation split instead and
  says so (``split`` and ``split_note``). A run stopped by a non-finite loss counts as
  infinite perplexity at its learning rate.
* The learning rate of a method (see :mod:`~slope_lightning.study.selection`): the sweep
  (``sweep``: mean validation loss over the sweep seeds of each lr of the grid), the refine
  (``refine``: the sweep's best and its better neighbour, mean validation loss over every
  seed) and the choice (the refine lr of the lowest mean). A sweep's best on the edge of its
  grid is a warning (the optimum may lie outside).
* Per method at its chosen lr: mean ± sample standard deviation over seeds.
* Ratios to the baseline method compare chosen against chosen: the ratio of mean
  perplexities, and the mean ± std of the per-seed ratios (runs with one seed share their
  initialisation seed and data order, so the per-seed ratio is paired).
* The paired training-loss difference is the mean over the last 10% of logged steps of
  (method − baseline) training loss, per seed, then mean ± std over seeds: every pair saw
  the same batches, so this is a low-noise comparison of the whole run, not of one number.
* The gap along training (``gap``): each method's validation perplexity over the baseline's
  at every validation point of the runs, paired by seed, against tokens seen (see
  :mod:`~slope_lightning.study.gap`). Methods trained at the baseline's lr (``lr_from``
  the baseline: pruning the baseline's model after training) are left out: until they
  prune, their curve is the baseline's.
* A run of fewer than 20 tokens per parameter is labelled *early training*: the numbers
  compare methods at that budget, not their final quality.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from slope_lightning.study.config import FORMAT, StudyConfig, format_lr
from slope_lightning.study.gap import paired_gap
from slope_lightning.study.selection import (
    EVAL_KEYS,
    choose,
    refine_loss,
    run_value,
    sweep_loss,
)

#: Below this many training tokens per parameter a study is "early training" (a
#: compute-optimal budget is about 20, Hoffmann et al. 2022).
EARLY_TRAINING_TOKENS_PER_PARAMETER = 20.0
#: The share of a run's last logged training steps the paired loss difference averages.
PAIRED_TAIL = 0.1


def _lr_row(method: str, lr: float, runs: list[dict[str, Any]], val_loss: float) -> dict[str, Any]:
    """What the sweep and the refine tables say of one (method, lr): its runs' validation
    perplexity (mean, std), how many ran and diverged, and the loss that chose."""
    ppl_mean, ppl_std = _mean_std([run_value(r) for r in runs])
    return {
        "method": method,
        "lr": lr,
        "seeds": len(runs),
        "diverged": sum(r["status"] == "diverged" for r in runs),
        "val_ppl": ppl_mean,
        "val_ppl_std": ppl_std,
        "val_loss": val_loss,
    }


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


def report_split(results: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The split the report's tables are on, and why when it is not the test split.

    ``("test", "")`` when every finished run was evaluated on the held-out test split; else
    ``("validation", why)``: the runs have no test split (``data.test_fraction: 0``, or made
    before the study evaluated it), so the tables fall back to the split that chose the
    learning rates, and say so. A study never mixes splits in one table.
    """
    finished = [r for r in results if r.get("status") != "diverged"]
    missing = [r for r in finished if not r.get("test_eval")]
    if not missing:
        return "test", ""
    why = (
        f"{len(missing)} of {len(finished)} finished runs have no evaluation on a held-out test "
        "split (their data config has data.test_fraction: 0, or they were made before the study "
        "evaluated it), so every table reports the validation split, the one that chose the "
        "learning rates: the numbers at the chosen lr carry that choice's selection bias. Run "
        "the study with data.test_fraction > 0 (the shipped configs set 0.05) for test numbers."
    )
    return "validation", why


def summarize(
    study: StudyConfig, results: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Any]:
    """Everything the report shows, as plain values (what ``<name>.json`` holds)."""
    by_key: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        by_key.setdefault((result["method"], float(result["lr"])), []).append(result)
    warnings: list[str] = []
    split, split_note = report_split(results)
    choices = choose(study, results)
    losses = sweep_loss(study, results)
    refined = refine_loss(study, results)

    def value(result: dict[str, Any]) -> float:
        return run_value(result, "ppl", split)

    sweep: list[dict[str, Any]] = []
    refine: list[dict[str, Any]] = []
    for method in study.methods:
        if not method.swept:
            continue
        choice = choices[method.name]
        sweep_best = min(choice.refine, key=lambda lr: losses[method.name][lr], default=None)
        for lr in method.lrs:
            runs = [r for r in by_key.get((method.name, lr), []) if r["seed"] in study.sweep_seeds]
            swept = _lr_row(method.name, lr, runs, losses[method.name].get(lr, math.nan))
            sweep.append(swept | {"best": lr == sweep_best, "refine": lr in choice.refine})
        seeds = study.seeds_of(method)
        for lr in choice.refine:
            runs = [r for r in by_key.get((method.name, lr), []) if r["seed"] in seeds]
            refined_row = _lr_row(method.name, lr, runs, refined[method.name].get(lr, math.nan))
            refine.append(
                refined_row
                | {
                    "of_seeds": len(seeds),
                    "sweep_best": lr == sweep_best,
                    "chosen": lr == choice.chosen,
                }
            )
        if choice.chosen is None:
            warnings.append(
                f"{method.name}: its sweep or refine has not finished (or every lr diverged)"
            )
            continue
        if len(method.lrs) > 1 and sweep_best in (method.lrs[0], method.lrs[-1]):
            edge = "lowest" if sweep_best == method.lrs[0] else "highest"
            warnings.append(
                f"{method.name}: the sweep's best learning rate {format_lr(sweep_best or 0)} is "
                f"the {edge} of its grid {[format_lr(lr) for lr in method.lrs]}; the optimum may "
                "lie outside"
            )
        if len(method.lrs) < 3:
            warnings.append(
                f"{method.name}: a grid of {len(method.lrs)} learning rates (a fair sweep has "
                "at least 3 on a log scale, its best with a neighbour on each side)"
            )

    def chosen_lr(name: str) -> float | None:
        method = study.method(name)
        return choices[name if method.swept else str(method.lr_from)].chosen

    def runs_at_best(name: str) -> dict[int, dict[str, Any]]:
        lr = chosen_lr(name)
        return {r["seed"]: r for r in by_key.get((name, lr), [])} if lr is not None else {}

    baseline = study.baseline_method.name
    base_runs = runs_at_best(baseline)
    base_ppl = _mean_std([value(r) for r in base_runs.values()])[0] if base_runs else math.nan
    table: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[float]]]] = {}
    gap: dict[str, list[list[float]]] = {}
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
        ppl, ppl_std = _mean_std([value(r) for r in runs])
        val_ppl, val_ppl_std = _mean_std([run_value(r) for r in runs])  # what chose the lr
        paired = [value(r) / value(ref_runs[r["seed"]]) for r in runs if r["seed"] in ref_runs]
        deltas = [
            d
            for r in runs
            if r["seed"] in ref_runs
            for d in [_tail_mean_difference(r, ref_runs[r["seed"]])]
            if d is not None
        ]
        evaluations = [e for r in runs if (e := r.get(EVAL_KEYS[split]))]
        sources = sorted({name for e in evaluations for name in e.get("per_source", {})})
        per_source = {
            name: _mean_std([e["per_source"][name]["ppl"] for e in evaluations]) for name in sources
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
                "per_seed_ppl": {str(r["seed"]): value(r) for r in runs},
                "ppl": ppl,
                "ppl_std": ppl_std,
                "val_ppl": val_ppl,
                "val_ppl_std": val_ppl_std,
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
                "evaluated_windows": evaluations[0].get("windows") if evaluations else None,
                "of_windows": evaluations[0].get("of_windows") if evaluations else None,
            }
        )
        table.append(row)
        curves[method.name] = _mean_curves(runs)
        if method.group == "method" and baseline not in (method.name, method.lr_from):
            # lr_from the baseline: the baseline's own run until it prunes after training,
            # so its curve over the baseline's says nothing (the tables give its end point)
            gap[method.name] = paired_gap(runs_at_best(method.name), base_runs)

    all_tokens = {r.get("tokens") for r in results}
    if len(all_tokens) > 1:
        warnings.append(
            "the runs did not all train on the same number of tokens: "
            f"{sorted(map(str, all_tokens))}"
        )
    tokens: int | None = next(iter(all_tokens)) if len(all_tokens) == 1 else None
    counted = {
        r["method"]: e["parameters"]
        for r in results
        if (e := r.get("eval")) and e.get("parameters")
    }
    parameters: int | None = counted.get(baseline, next(iter(counted.values()), None))
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
    planned = study.planned_count(choices)
    return {
        "format": FORMAT,
        "name": study.name,
        "description": study.description,
        "info": info,
        "split": split,
        "split_note": split_note,
        "complete": len(results) == planned,
        "runs_planned": planned,
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
        "refine": refine,
        "curves": curves,
        "gap": {name: points for name, points in gap.items() if points},
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
