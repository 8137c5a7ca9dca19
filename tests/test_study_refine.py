"""The study's learning-rate protocol and its reporting split: the sweep on the sweep seeds,
the refine (the sweep's best lr and its better neighbour on every seed), the choice (the best
mean validation loss over every seed), the ``lr_from`` methods at the chosen lr, resuming
without re-running a finished run, and the report's tables on the held-out test split.

A fake fit writes what the runner reads (a version directory with its config and a
checkpoint) and a fake evaluator gives each run a validation and a test loss from a table, so
every test takes well under a second; ``tests/test_study.py`` runs the real thing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from slope_lightning.study import (
    LaunchResult,
    LrChoice,
    StaleRunError,
    StudyConfig,
    choose,
    finished_results,
    machine_info,
    run_study,
    summarize,
    write_report,
)
from slope_lightning.study.selection import refine_lrs

ROOT = Path(__file__).parents[1]

#: Validation loss of each sweep and refine run, ``(method, lr, seed) -> loss`` (None:
#: diverged). dense's sweep (seed 0) is best at 4e-3, but 4e-3 stalls on seeds 1 and 2 (the
#: case of a learning rate chosen on one seed at its stability edge): the refine chooses 2e-3.
VALIDATION: dict[tuple[str, float, int], float | None] = {
    ("dense", 1e-3, 0): 5.0,
    ("dense", 2e-3, 0): 4.6,
    ("dense", 4e-3, 0): 4.5,
    ("dense", 8e-3, 0): 4.8,
    ("dense", 2e-3, 1): 4.6,
    ("dense", 2e-3, 2): 4.7,
    ("dense", 4e-3, 1): 4.9,
    ("dense", 4e-3, 2): 5.0,
    ("slope", 1e-3, 0): 5.2,
    ("slope", 2e-3, 0): 4.7,
    ("slope", 4e-3, 0): None,  # diverged: not a neighbour worth refining
    ("slope", 1e-3, 1): 5.1,
    ("slope", 1e-3, 2): 5.1,
    ("slope", 2e-3, 1): 4.7,
    ("slope", 2e-3, 2): 4.8,
}
#: The test split's loss is the validation loss plus this, per method (a distinct number).
TEST_OFFSET = {"dense": 0.25, "slope": 0.2, "variant": 0.3}
#: The runs the study launches: the sweep, the refine on seeds 1 and 2 (seed 0's refine runs
#: are the sweep's), and the variant at dense's chosen lr on every seed.
EXPECTED = {
    *[("dense", lr, 0) for lr in (1e-3, 2e-3, 4e-3, 8e-3)],
    *[("slope", lr, 0) for lr in (1e-3, 2e-3, 4e-3)],
    *[("dense", lr, seed) for lr in (2e-3, 4e-3) for seed in (1, 2)],
    *[("slope", lr, seed) for lr in (1e-3, 2e-3) for seed in (1, 2)],
    *[("variant", 2e-3, seed) for seed in (0, 1, 2)],
}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["slope-lightning"])


def _study(tmp_path: Path, **changes: Any) -> StudyConfig:
    data: dict[str, Any] = {
        "name": "refine",
        "base_config": str(ROOT / "configs" / "tiny.yaml"),
        "runs_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "seeds": [0, 1, 2],
        "sweep_seeds": [0],
        "common": ["--trainer.max_steps=4"],
        "methods": {
            "dense": {"args": ["--model.sparsity.sparse=false"], "lrs": [1e-3, 2e-3, 4e-3, 8e-3]},
            "slope": {"lrs": [1e-3, 2e-3, 4e-3]},
            "variant": {"lr_from": "dense", "args": ["--model.sparsity.n=1"]},
        },
    }
    data.update(changes)
    return StudyConfig.from_dict(data)


def _run_key(root: Path) -> tuple[str, float, int]:
    """``(method, lr, seed)`` of a run folder ``<runs_dir>/<method>/lr<lr>/seed<seed>``."""
    method, lr, seed = root.parts[-3:]
    return method, float(lr.removeprefix("lr")), int(seed.removeprefix("seed"))


def _validation_loss(key: tuple[str, float, int]) -> float | None:
    if key[0] == "variant":
        return 4.4 + 0.01 * key[2]
    return VALIDATION[key]


def _test_ppl(method: str, lr: float, seed: int) -> float:
    """The test perplexity :class:`TableEvaluator` gives a finished run."""
    loss = _validation_loss((method, lr, seed))
    assert loss is not None
    return math.exp(loss + TEST_OFFSET[method])


class TableFit:
    """A fake fit: writes ``version_0/config.yaml`` and a checkpoint; a run whose validation
    loss is None diverges; ``interrupt`` names a run that is interrupted (exit 130) the first
    time it is launched, after writing its checkpoint."""

    def __init__(self, test_fraction: float = 0.05, interrupt: str | None = None) -> None:
        self.test_fraction = test_fraction
        self.interrupt = interrupt
        self.calls: list[tuple[tuple[str, float, int], list[str]]] = []

    def __call__(self, args: list[str], log_file: Path) -> LaunchResult:
        root = log_file.parent
        key = _run_key(root)
        self.calls.append((key, args))
        version = root / "version_0"
        (version / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {
            "trainer": {"max_steps": 4, "devices": 1},
            "data": {"batch_size": 2, "seq_len": 8, "test_fraction": self.test_fraction},
            "model": {"preset": "tiny"},
        }
        (version / "config.yaml").write_text(yaml.safe_dump(config))
        torch.save({"global_step": 2}, version / "checkpoints" / "last.ckpt")
        if "/".join(root.parts[-3:]) == self.interrupt:
            self.interrupt = None
            return LaunchResult(130, "error: interrupted")
        if _validation_loss(key) is None:
            return LaunchResult(1, "error: non-finite loss at global step 3")
        return LaunchResult(0)


class TableEvaluator:
    """Each run's validation loss from :data:`VALIDATION`, its test loss that plus
    :data:`TEST_OFFSET`; the test split's per-source numbers are 1.1× the overall."""

    def evaluate(
        self, export_dir: Path, config: dict[str, Any], split: str = "validation"
    ) -> dict[str, Any]:
        key = _run_key(export_dir.parents[1])
        loss = _validation_loss(key)
        assert loss is not None
        if split == "test":
            loss += TEST_OFFSET[key[0]]
        return {
            "split": split,
            "loss": loss,
            "ppl": math.exp(loss),
            "windows": 4,
            "of_windows": 4,
            "tokens": 32,
            "per_source": {"wiki": {"loss": loss, "ppl": 1.1 * math.exp(loss), "tokens": 32}},
            "parameters": 100,
        }


def _keys(study: StudyConfig) -> list[tuple[str, float, int]]:
    return [(r["method"], r["lr"], r["seed"]) for r in finished_results(study)]


def test_refine_runs_the_best_and_its_better_neighbour_on_every_seed_and_picks_the_best_mean(
    tmp_path: Path,
) -> None:
    study = _study(tmp_path)
    fit = TableFit()
    outcomes = run_study(study, fit, TableEvaluator())  # type: ignore[arg-type]
    launched = [key for key, _ in fit.calls]
    assert sorted(launched) == sorted(EXPECTED)  # each once: a refine run on seed 0 is reused
    assert {o.state for o in outcomes} == {"finished", "diverged"}
    choices = choose(study, finished_results(study))
    # dense: the sweep's best 4e-3 and its better neighbour 2e-3 (4.6 < 4.8); over every seed
    # 2e-3 has the lower mean (4.63 against 4.8), so it is chosen.
    assert choices["dense"] == LrChoice(refine=(2e-3, 4e-3), chosen=2e-3)
    # slope: 4e-3 diverged, so the better neighbour of its best 2e-3 is 1e-3.
    assert choices["slope"] == LrChoice(refine=(1e-3, 2e-3), chosen=2e-3)
    assert study.planned_count(choices) == len(EXPECTED) == len(finished_results(study))


def test_lr_from_follows_the_refined_lr_not_the_sweeps_best(tmp_path: Path) -> None:
    study = _study(tmp_path)
    fit = TableFit()
    run_study(study, fit, TableEvaluator())  # type: ignore[arg-type]
    variant = [args for key, args in fit.calls if key[0] == "variant"]
    assert len(variant) == 3
    assert all("--model.optimizer.lr=0.002" in args for args in variant)  # not 0.004
    # The variant runs only once dense's refine has finished on every seed.
    order = [key for key, _ in fit.calls]
    first_variant = min(i for i, key in enumerate(order) if key[0] == "variant")
    last_dense = max(i for i, key in enumerate(order) if key[0] == "dense")
    assert first_variant > last_dense


def test_refine_lrs_of_a_grid() -> None:
    study = _study(Path("unused"))
    dense = study.method("dense")  # grid 1e-3, 2e-3, 4e-3, 8e-3
    losses = {1e-3: 5.0, 2e-3: 4.6, 4e-3: 4.5, 8e-3: 4.4}
    assert refine_lrs(dense, losses) == (4e-3, 8e-3)  # best on the edge: its one neighbour
    assert refine_lrs(dense, {**losses, 8e-3: math.inf}) == (2e-3, 4e-3)
    lone = {1e-3: 5.0, 2e-3: math.inf, 4e-3: 4.5, 8e-3: math.inf}
    assert refine_lrs(dense, lone) == (4e-3,)  # both neighbours diverged: the best alone
    assert refine_lrs(dense, {1e-3: 5.0, 2e-3: 4.6}) == ()  # the sweep has not finished
    assert refine_lrs(dense, dict.fromkeys(losses, math.inf)) == ()  # every lr diverged
    one = _study(Path("unused"), methods={"dense": {"lrs": [1e-3]}}).method("dense")
    assert refine_lrs(one, {1e-3: 5.0}) == (1e-3,)


def test_an_interrupted_refine_resumes_and_nothing_finished_runs_again(tmp_path: Path) -> None:
    study = _study(tmp_path)
    first = TableFit(interrupt="dense/lr0.004/seed1")
    with pytest.raises(KeyboardInterrupt, match="run the study again to resume"):
        run_study(study, first, TableEvaluator())  # type: ignore[arg-type]
    done_before = set(_keys(study))
    assert ("dense", 4e-3, 1) not in done_before and ("dense", 2e-3, 1) in done_before

    again = TableFit()
    run_study(study, again, TableEvaluator())  # type: ignore[arg-type]
    relaunched = [key for key, _ in again.calls]
    assert relaunched[0] == ("dense", 4e-3, 1) and again.calls[0][1][-1] == "--ckpt_path=last"
    assert not set(relaunched) & done_before  # nothing finished is launched again
    assert sorted([key for key, _ in first.calls if key != relaunched[0]] + relaunched) == sorted(
        EXPECTED
    )

    # Finished: a third invocation launches nothing; a changed study file is refused.
    idle = TableFit()
    run_study(study, idle, TableEvaluator())  # type: ignore[arg-type]
    assert idle.calls == []
    changed = _study(tmp_path, common=["--trainer.max_steps=8"])
    with pytest.raises(StaleRunError, match="other fit arguments than the study now gives"):
        run_study(changed, TableFit(), TableEvaluator())  # type: ignore[arg-type]


def test_the_reports_tables_are_on_the_test_split(tmp_path: Path) -> None:
    study = _study(tmp_path)
    run_study(study, TableFit(), TableEvaluator())  # type: ignore[arg-type]
    results = finished_results(study)
    summary = summarize(study, results, machine_info("slope-lightning study --config x"))
    assert summary["split"] == "test" and summary["split_note"] == "" and summary["complete"]
    table = {row["method"]: row for row in summary["table"]}
    dense = table["dense"]
    test_dense = [_test_ppl("dense", 2e-3, s) for s in (0, 1, 2)]
    assert dense["best_lr"] == 2e-3
    assert dense["ppl"] == pytest.approx(sum(test_dense) / 3)
    assert dense["per_seed_ppl"]["1"] == pytest.approx(test_dense[1])
    assert dense["per_source_ppl"]["wiki"][0] == pytest.approx(1.1 * sum(test_dense) / 3)
    slope = table["slope"]
    test_slope = [_test_ppl("slope", 2e-3, s) for s in (0, 1, 2)]
    paired = sum(a / b for a, b in zip(test_slope, test_dense, strict=True)) / 3
    assert slope["paired_ratio"] == pytest.approx(paired)
    assert slope["vs_baseline"] == pytest.approx(sum(test_slope) / sum(test_dense))
    # Validation appears where it chose: the sweep and the refine.
    refine = {(r["method"], r["lr"]): r for r in summary["refine"]}
    assert refine[("dense", 2e-3)]["chosen"] and not refine[("dense", 4e-3)]["chosen"]
    assert refine[("dense", 4e-3)]["sweep_best"] and refine[("dense", 4e-3)]["seeds"] == 3
    assert refine[("dense", 4e-3)]["val_loss"] == pytest.approx((4.5 + 4.9 + 5.0) / 3)
    sweep = {(r["method"], r["lr"]): r for r in summary["sweep"]}
    assert sweep[("dense", 4e-3)]["best"] and sweep[("dense", 2e-3)]["refine"]
    assert not sweep[("dense", 1e-3)]["refine"]

    markdown = write_report(study, results, summary["info"])["markdown"].read_text()
    assert "**Test split.**" in markdown and "**Validation numbers.**" not in markdown
    assert "## Each method at its chosen learning rate (test split)" in markdown
    assert "| method | lr | test ppl (mean ± std) |" in markdown
    headline = markdown.split("## Each method")[1].split("\n\n")[1]
    mean = sum(test_dense) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in test_dense) / 2)
    assert f"| dense | 0.002 | {mean:.1f} ± {std:.1f} | 1.000 |" in headline
    assert "## Learning rate: sweep, refine, choice (validation split)" in markdown
    assert "| dense | 0.002 |" in markdown.split("### Refine and choice")[1]
    assert "**chosen**" in markdown and "0.004 (sweep best)" in markdown


def test_runs_without_a_test_split_report_validation_and_say_why(tmp_path: Path) -> None:
    study = _study(tmp_path)
    run_study(study, TableFit(test_fraction=0.0), TableEvaluator())  # type: ignore[arg-type]
    results = finished_results(study)
    assert all(r["test_eval"] is None for r in results)
    summary = summarize(study, results, machine_info("x"))
    assert summary["split"] == "validation" and "data.test_fraction: 0" in summary["split_note"]
    dense = next(row for row in summary["table"] if row["method"] == "dense")
    assert dense["ppl"] == pytest.approx(dense["val_ppl"])
    markdown = write_report(study, results, summary["info"])["markdown"].read_text()
    assert "**Validation numbers.**" in markdown and "selection bias" in markdown
    assert "## Each method at its chosen learning rate (validation split)" in markdown
    assert "| method | lr | val ppl (mean ± std) |" in markdown
