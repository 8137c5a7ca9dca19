"""The study's report: each method at its chosen learning rate, paired ratios, the sweep's
warnings, and what runs logged before training, from hand-made run records (no fit).
``tests/test_study_refine.py`` checks the refine stage and the test split end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from slope_lightning.study import StudyConfig, machine_info, summarize, write_report

ROOT = Path(__file__).parents[1]


def _study(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "demo",
        "base_config": str(ROOT / "configs" / "tiny.yaml"),
        "runs_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "seeds": [0, 1],
        "sweep_seeds": [0, 1],
        "common": ["--trainer.max_steps=4"],
    }
    data.update(changes)
    return data


def _result(
    method: str, lr: float, seed: int, ppl: float, status: str = "finished"
) -> dict[str, Any]:
    loss = math.log(ppl)
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "status": status,
        "tokens": 1000,
        "wall_s": 10.0,
        "resumed": False,
        "eval": None
        if status == "diverged"
        else {
            "loss": loss,
            "ppl": ppl,
            "windows": 4,
            "of_windows": 8,
            "parameters": 100,
            "per_source": {"wiki": {"ppl": ppl * 1.1}, "shakespeare": {"ppl": ppl * 0.9}},
        },
        "curves": {"train/loss": [[s, loss + 1 - s / 100] for s in range(0, 100, 10)]},
    }


def test_report_picks_the_best_lr_per_method_and_compares_paired_runs(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(
        _study(
            tmp_path,
            methods={
                "dense": {"lrs": [1e-3, 2e-3, 4e-3]},
                "slope": {"lrs": [1e-3, 2e-3, 4e-3]},
            },
        )
    )
    results = [
        _result("dense", 1e-3, 0, 110.0),
        _result("dense", 1e-3, 1, 112.0),
        _result("dense", 2e-3, 0, 100.0),
        _result("dense", 2e-3, 1, 104.0),
        _result("dense", 4e-3, 0, 130.0),
        _result("dense", 4e-3, 1, 1.0, status="diverged"),
        _result("slope", 1e-3, 0, 120.0),
        _result("slope", 1e-3, 1, 121.0),
        _result("slope", 2e-3, 0, 115.0),
        _result("slope", 2e-3, 1, 117.0),
        _result("slope", 4e-3, 0, 105.0),
        _result("slope", 4e-3, 1, 106.0),
    ]
    summary = summarize(study, results, machine_info("slope-lightning study --config x"))
    table = {row["method"]: row for row in summary["table"]}
    assert table["dense"]["best_lr"] == 2e-3 and table["slope"]["best_lr"] == 4e-3
    assert table["dense"]["val_ppl"] == pytest.approx(102.0)
    assert table["dense"]["val_ppl_std"] == pytest.approx(math.sqrt(8.0))
    assert table["slope"]["vs_baseline"] == pytest.approx(105.5 / 102.0)
    assert table["slope"]["paired_ratio"] == pytest.approx((105 / 100 + 106 / 104) / 2)
    expected_delta = ((math.log(105) - math.log(100)) + (math.log(106) - math.log(104))) / 2
    assert table["slope"]["train_loss_delta"] == pytest.approx(expected_delta)
    assert table["slope"]["per_source_ppl"]["wiki"][0] == pytest.approx(105.5 * 1.1)
    sweep = {(r["method"], r["lr"]): r for r in summary["sweep"]}
    assert sweep[("dense", 4e-3)]["diverged"] == 1 and math.isinf(sweep[("dense", 4e-3)]["val_ppl"])
    assert sweep[("dense", 2e-3)]["best"] and not sweep[("dense", 1e-3)]["best"]
    warnings = "\n".join(summary["warnings"])
    assert "slope: the sweep's best learning rate 0.004 is the highest of its grid" in warnings
    assert "dense: the sweep's best learning rate" not in warnings
    assert "a grid of" not in warnings  # 3 lrs: the best can have a neighbour on each side
    assert summary["early_training"] and summary["tokens_per_parameter"] == pytest.approx(10.0)
    assert summary["complete"] and summary["runs_diverged"] == 1
    partial = summarize(study, results[:-1], summary["info"])
    assert not partial["complete"] and partial["runs_finished"] == 11
    assert "slope: no learning rate" not in "\n".join(partial["warnings"])  # 2e-3 still has both

    paths = write_report(study, results, summary["info"])
    markdown = paths["markdown"].read_text()
    assert "**Early training.**" in markdown and "| SLoPe" not in markdown  # no label: name
    assert "| slope | 0.004 | 105.5 ± 0.7 | 1.034 |" in markdown
    assert "| dense | 0.004 | diverged |" in markdown
    assert json.loads(paths["json"].read_text())["table"][0]["best_lr"] == 2e-3
    assert paths["sweep"].stat().st_size > 0 and paths["curves"].stat().st_size > 0


def test_report_shows_what_runs_logged_before_training(tmp_path: Path) -> None:
    """InitFromPretrained's pretrained and one-shot perplexities reach the report."""
    study = StudyConfig.from_dict(
        _study(tmp_path, seeds=[0], sweep_seeds=[0], methods={"slope": {"lrs": [1e-4]}})
    )
    result = _result("slope", 1e-4, 0, 40.0)
    result["logged"] = {"pretrained/dense_ppl": 31.0, "pretrained/one_shot_ppl": 2269.0}
    summary = summarize(study, [result], machine_info("x"))
    (row,) = summary["table"]
    assert row["before_training"]["pretrained/one_shot_ppl"][0] == 2269.0
    markdown = write_report(study, [result], summary["info"])["markdown"].read_text()
    assert "| slope | 31.0 | 2269.0 | 40.0 |" in markdown
    # With a test split, the after-training number beside them stays on their (validation)
    # windows, and the test number follows.
    result["test_eval"] = {**result["eval"], "loss": math.log(44.0), "ppl": 44.0}
    markdown = write_report(study, [result], summary["info"])["markdown"].read_text()
    assert "| after training (val ppl) | after training (test ppl) |" in markdown
    assert "| slope | 31.0 | 2269.0 | 40.0 | 44.0 |" in markdown


def _with_val_curve(result: dict[str, Any], losses: list[float]) -> dict[str, Any]:
    """A record whose run logged ``val/loss`` every 10 of its 40 steps (25 tokens a step)."""
    result["steps"] = 40
    result["curves"]["val/loss"] = [[10 * (i + 1), loss] for i, loss in enumerate(losses)]
    return result


def test_the_gap_along_training_is_paired_by_seed_against_tokens_seen(tmp_path: Path) -> None:
    """Each method over the baseline at every validation point: exp(loss - baseline's loss)
    of one seed, then mean ± std over seeds; in the JSON, the markdown and a figure."""
    study = StudyConfig.from_dict(
        _study(
            tmp_path,
            methods={
                "dense": {"lrs": [1e-3]},
                "slope": {"lrs": [1e-3]},
                "ablated": {"lr_from": "slope", "group": "ablation"},
                "pruned-after": {"lr_from": "dense"},
            },
        )
    )
    results = [
        _with_val_curve(_result("dense", 1e-3, 0, 100.0), [5.0, 4.0, 3.0, 2.0]),
        _with_val_curve(_result("dense", 1e-3, 1, 100.0), [5.0, 4.2, 3.2, 2.2]),
        # seed 0: behind by 0.2 nats, then level; seed 1: behind by 0.1 nats, then level.
        _with_val_curve(_result("slope", 1e-3, 0, 100.0), [5.2, 4.1, 3.0, 2.0]),
        _with_val_curve(_result("slope", 1e-3, 1, 100.0), [5.1, 4.3, 3.2, 2.2]),
        _with_val_curve(_result("ablated", 1e-3, 0, 100.0), [9.0, 9.0, 9.0, 9.0]),
        _with_val_curve(_result("ablated", 1e-3, 1, 100.0), [9.0, 9.0, 9.0, 9.0]),
        _with_val_curve(_result("pruned-after", 1e-3, 0, 100.0), [5.0, 4.0, 3.0, 2.0]),
    ]
    summary = summarize(study, results, machine_info("test"))
    # ablations keep to their own table; a method at dense's lr is dense's run until it
    # prunes after training, so its curve would read 1.000 whatever pruning costs
    assert set(summary["gap"]) == {"slope"}
    assert any(w.startswith("dense: a grid of 1 learning rates") for w in summary["warnings"])
    tokens = [point[0] for point in summary["gap"]["slope"]]
    assert tokens == [250.0, 500.0, 750.0, 1000.0]  # steps x 25 tokens a step
    first = summary["gap"]["slope"][0]
    assert first[1] == pytest.approx((math.exp(0.2) + math.exp(0.1)) / 2)
    assert first[2] == pytest.approx(abs(math.exp(0.2) - math.exp(0.1)) / math.sqrt(2))
    assert first[3] == 2
    assert summary["gap"]["slope"][-1][1:3] == pytest.approx([1.0, 0.0])
    paths = write_report(study, results, machine_info("test"))
    markdown = paths["markdown"].read_text()
    assert "## The gap along training" in markdown
    assert "| 250 | 1.163 ± 0.082 |" in markdown and "| 1,000 | 1.000 ± 0.000 |" in markdown
    assert paths["gap"].name == "demo-gap.png" and paths["gap"].stat().st_size > 0


def test_no_gap_without_a_shared_seed_or_a_validation_curve(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(
        _study(tmp_path, methods={"dense": {"lrs": [1e-3]}, "slope": {"lrs": [1e-3]}})
    )
    results = [_result(m, 1e-3, s, 100.0) for m in ("dense", "slope") for s in (0, 1)]
    summary = summarize(study, results, machine_info("test"))
    assert summary["gap"] == {}
    assert (
        "gap along training"
        not in write_report(study, results, machine_info("test"))["markdown"].read_text()
    )
