"""The gap along training: a method's validation perplexity over the baseline's, paired seed
by seed, at every validation point both logged, against the tokens seen by then.

One end point cannot say whether a gap opens, closes or stays as training goes on; the
validation curve each run logs can (its ``val/loss``: the training loop's validation sample,
the same windows for every run of the study). The ratio of perplexities at a point is
``exp(loss_method - loss_baseline)`` of one seed (both runs saw the same batches), then the
mean ± sample standard deviation over the seeds both have.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

#: The logged curve the gap is read from.
GAP_TAG = "val/loss"


def tokens_per_step(run: Mapping[str, Any]) -> float | None:
    """Training tokens per optimizer step of a run's record (None if it does not say)."""
    tokens, steps = run.get("tokens"), run.get("steps")
    return tokens / steps if tokens and steps else None


def paired_gap(
    runs: Mapping[int, Mapping[str, Any]], base_runs: Mapping[int, Mapping[str, Any]]
) -> list[list[float]]:
    """``[[tokens seen, mean ratio, std ratio, seeds], ...]`` at every step that each seed of
    both ``runs`` and ``base_runs`` (``seed -> record``) logged; empty without a common seed
    or without a known token count."""
    seeds = sorted(set(runs) & set(base_runs))
    if not seeds:
        return []
    per_step = tokens_per_step(runs[seeds[0]])
    if per_step is None or any(tokens_per_step(base_runs[s]) != per_step for s in seeds):
        return []
    ratios: dict[int, list[float]] = {}
    for seed in seeds:
        mine = dict(map(tuple, runs[seed].get("curves", {}).get(GAP_TAG, [])))
        base = dict(map(tuple, base_runs[seed].get("curves", {}).get(GAP_TAG, [])))
        for step in set(mine) & set(base):
            ratios.setdefault(int(step), []).append(math.exp(mine[step] - base[step]))
    out = []
    for step in sorted(ratios):
        values = ratios[step]
        if len(values) != len(seeds):
            continue  # a point some seed did not log: not a paired mean over every seed
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        out.append([step * per_step, statistics.fmean(values), std, float(len(values))])
    return out
