"""How a study reads its finished runs: a run's validation number, and each swept method's best
learning rate (the rule both the planner and the report follow, so they never disagree)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from slope_lightning.study.config import StudyConfig


def run_value(result: dict[str, Any], key: str = "ppl") -> float:
    """A run's validation ``ppl`` or ``loss``: its export's evaluation, else (no evaluation)
    its last logged ``val/<key>``; infinite for a diverged run."""
    if result.get("status") == "diverged":
        return math.inf
    evaluation = result.get("eval")
    if evaluation:
        return float(evaluation[key])
    return float(result.get("logged", {}).get(f"val/{key}", math.nan))


def sweep_loss(
    study: StudyConfig, results: Iterable[dict[str, Any]]
) -> dict[str, dict[float, float]]:
    """``method -> {lr: mean validation loss over the sweep seeds}`` of every swept method's
    learning rates whose sweep runs have all finished (infinite if any seed diverged)."""
    runs: dict[tuple[str, float, int], dict[str, Any]] = {
        (r["method"], float(r["lr"]), int(r["seed"])): r for r in results
    }
    out: dict[str, dict[float, float]] = {}
    for method in study.methods:
        if not method.swept:
            continue
        losses = {}
        for lr in method.lrs:
            found = [runs.get((method.name, lr, seed)) for seed in study.sweep_seeds]
            if all(r is not None for r in found):
                values = [run_value(r, "loss") for r in found if r is not None]
                losses[lr] = (
                    math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)
                )
        out[method.name] = losses
    return out


def best_learning_rates(
    study: StudyConfig, results: Iterable[dict[str, Any]]
) -> dict[str, float | None]:
    """Each swept method's best learning rate: the lowest mean validation loss over the sweep
    seeds, once every learning rate of its grid has finished on every sweep seed (None
    before, or when every one diverged)."""
    best: dict[str, float | None] = {}
    for method, losses in sweep_loss(study, results).items():
        grid = study.method(method).lrs
        finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
        best[method] = (
            min(finite, key=lambda lr: finite[lr]) if len(losses) == len(grid) and finite else None
        )
    return best
