"""How a study reads its finished runs: a run's number on a split, and each swept method's
learning rate (the sweep, the refine and the choice: the rule both the planner and the report
follow, so they never disagree). Validation chooses; the test split only reports.

* The **sweep** loss of an lr: its mean validation loss over the sweep seeds.
* The **refine** lrs: the sweep's best (lowest finite sweep loss; ties to the lower lr) and
  its better neighbour on the grid (the adjacent lr of lower finite sweep loss).
* The **choice**: the refine lr of the lowest mean validation loss over every seed of the
  method. A diverged run counts as infinite loss, so an lr that diverged on any seed loses.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from slope_lightning.study.config import LrChoice, MethodSpec, StudyConfig

#: The two splits a run is evaluated on: ``validation`` chooses, ``test`` reports.
SPLITS = ("validation", "test")
#: The key of each split's evaluation in a run's ``result.json``.
EVAL_KEYS = {"validation": "eval", "test": "test_eval"}


def run_value(result: dict[str, Any], key: str = "ppl", split: str = "validation") -> float:
    """A run's ``ppl`` or ``loss`` on ``split``: its export's evaluation; for validation
    without one, its last logged ``val/<key>``; infinite for a diverged run; NaN when the
    run has no evaluation on the test split (``data.test_fraction: 0``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if result.get("status") == "diverged":
        return math.inf
    evaluation = result.get(EVAL_KEYS[split])
    if evaluation:
        return float(evaluation[key])
    if split == "test":
        return math.nan
    return float(result.get("logged", {}).get(f"val/{key}", math.nan))


def _mean_loss(found: Sequence[dict[str, Any] | None]) -> float | None:
    """Mean validation loss of runs (None if any is unfinished; infinite if any diverged)."""
    if not found or any(r is None for r in found):
        return None
    values = [run_value(r, "loss") for r in found if r is not None]
    return math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)


def _index(results: Iterable[dict[str, Any]]) -> dict[tuple[str, float, int], dict[str, Any]]:
    return {(r["method"], float(r["lr"]), int(r["seed"])): r for r in results}


def sweep_loss(
    study: StudyConfig, results: Iterable[dict[str, Any]]
) -> dict[str, dict[float, float]]:
    """``method -> {lr: mean validation loss over the sweep seeds}`` of every swept method's
    learning rates whose sweep runs have all finished (infinite if any seed diverged)."""
    runs = _index(results)
    out: dict[str, dict[float, float]] = {}
    for method in study.methods:
        if not method.swept:
            continue
        losses = {}
        for lr in method.lrs:
            loss = _mean_loss([runs.get((method.name, lr, seed)) for seed in study.sweep_seeds])
            if loss is not None:
                losses[lr] = loss
        out[method.name] = losses
    return out


def refine_lrs(method: MethodSpec, losses: dict[float, float]) -> tuple[float, ...]:
    """The sweep's best lr of ``method`` and its better neighbour on the grid, ascending;
    empty while the sweep is unfinished (``losses`` lacks an lr) or when every lr diverged."""
    grid = method.lrs
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    if len(losses) != len(grid) or not finite:
        return ()
    best = min(finite, key=lambda lr: finite[lr])
    at = grid.index(best)
    neighbours = [grid[i] for i in (at - 1, at + 1) if 0 <= i < len(grid) and grid[i] in finite]
    if not neighbours:
        return (best,)
    better = min(neighbours, key=lambda lr: finite[lr])
    return tuple(sorted((best, better)))


def refine_loss(
    study: StudyConfig, results: Iterable[dict[str, Any]]
) -> dict[str, dict[float, float]]:
    """``method -> {lr: mean validation loss over every seed of the method}`` of each swept
    method's refine lrs whose runs have all finished (infinite if any seed diverged)."""
    runs = _index(results)
    sweep = sweep_loss(study, runs.values())
    out: dict[str, dict[float, float]] = {}
    for name, losses in sweep.items():
        method = study.method(name)
        out[name] = {}
        for lr in refine_lrs(method, losses):
            found = [runs.get((name, lr, seed)) for seed in study.seeds_of(method)]
            loss = _mean_loss(found)
            if loss is not None:
                out[name][lr] = loss
    return out


def choose(study: StudyConfig, results: Iterable[dict[str, Any]]) -> dict[str, LrChoice]:
    """What the finished runs decide for each swept method: its refine lrs and, once every
    refine run has finished, its chosen lr (None when each refine lr diverged on a seed)."""
    results = list(results)
    sweep = sweep_loss(study, results)
    refined = refine_loss(study, results)
    choices: dict[str, LrChoice] = {}
    for name, losses in sweep.items():
        refine = refine_lrs(study.method(name), losses)
        means = refined[name]
        finite = {lr: loss for lr, loss in means.items() if math.isfinite(loss)}
        complete = bool(refine) and len(means) == len(refine)
        chosen = min(finite, key=lambda lr: finite[lr]) if complete and finite else None
        choices[name] = LrChoice(refine=refine, chosen=chosen)
    return choices


def best_learning_rates(
    study: StudyConfig, results: Iterable[dict[str, Any]]
) -> dict[str, float | None]:
    """Each swept method's chosen learning rate (see :func:`choose`; None while its sweep or
    refine is unfinished, or when every candidate diverged)."""
    return {name: choice.chosen for name, choice in choose(study, results).items()}
