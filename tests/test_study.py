"""The quality-study runner: its file, its plan, resuming without re-running finished runs,
failures and divergence, and the ``slope-lightning study`` command (the report's numbers:
``tests/test_study_report.py``; the refine stage and the test split: ``test_study_refine.py``).

Most tests drive the runner with a fake launcher that writes what a fit writes (a version
directory with its config and TensorBoard scalars, a checkpoint), so they take a second; one
slow test runs the real thing in-process: 2 methods × 2 learning rates × 2 seeds of a tiny
model on a generated corpus.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_helpers import write_corpus
from slope_lightning.cli import main
from slope_lightning.study import (
    LaunchResult,
    LrChoice,
    StaleRunError,
    StudyConfig,
    StudyConfigError,
    choose,
    finished_results,
    read_marker,
    run_study,
)
from slope_lightning.study.runner import in_process_launcher

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "configs" / "studies").glob("*.yaml"))
#: The studies that compare methods (the others check a recipe at one lr and seed).
FAIR_STUDIES = {"tiny", "tiny-long", "gpt2-small"}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it sees pytest's own arguments beside ``args``."""
    monkeypatch.setattr(sys, "argv", ["slope-lightning"])


def _study(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "demo",
        "base_config": str(ROOT / "configs" / "tiny.yaml"),
        "runs_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "seeds": [0, 1],
        "sweep_seeds": [0, 1],  # every lr on every seed (the refine stage: its own tests)
        "common": ["--trainer.max_steps=4"],
        "methods": {
            "dense": {"args": ["--model.sparsity.sparse=false"], "lrs": [1e-3, 3e-3]},
            "slope": {"lrs": [3e-3, 1e-3], "label": "SLoPe 2:4"},
        },
    }
    data.update(changes)
    return data


# ---------------------------------------------------------------------------------------------
# The study file and its plan
# ---------------------------------------------------------------------------------------------


def test_plan_is_seeds_by_methods_by_lrs_each_a_fit(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(_study(tmp_path))
    plan = study.plan()
    assert [spec.run_id for spec in plan] == [
        f"{m}/lr{lr}/seed{s}"
        for s in (0, 1)
        for m in ("dense", "slope")
        for lr in ("0.001", "0.003")
    ]
    spec = plan[0]
    assert spec.root == tmp_path / "runs" / "dense" / "lr0.001" / "seed0"
    assert spec.args[:3] == ("fit", "--config", str(ROOT / "configs" / "tiny.yaml"))
    assert "--model.sparsity.sparse=false" in spec.args
    assert "--seed_everything=0" in spec.args and "--model.optimizer.lr=0.001" in spec.args
    logger = json.loads(next(a for a in spec.args if a.startswith("--trainer.logger="))[17:])
    assert logger["init_args"] == {"save_dir": str(tmp_path / "runs"), "name": spec.run_id}
    assert study.baseline_method.name == "dense"


def test_plan_sweeps_then_refines_on_every_seed_then_follows_the_chosen_lr(
    tmp_path: Path,
) -> None:
    study = StudyConfig.from_dict(
        _study(
            tmp_path,
            seeds=[0, 1, 2],
            sweep_seeds=[0],
            methods={
                "variant": {"lr_from": "slope", "args": ["--model.sparsity.n=1"]},
                "dense": {"args": ["--model.sparsity.sparse=false"], "lrs": [1e-3, 3e-3]},
                "slope": {"lrs": [1e-3, 3e-3]},
                "ablation": {"lr_from": "dense", "seeds": [0], "group": "ablation"},
            },
        )
    )
    # Each swept method: 2 lrs on seed 0, then its 2 refine lrs on seeds 1 and 2.
    assert study.planned_count() == 2 * (2 + 2 * 2) + 3 + 1
    # Before any sweep has finished, only the sweep can be planned.
    sweep = ["dense/lr0.001/seed0", "dense/lr0.003/seed0", "slope/lr0.001/seed0"]
    sweep.append("slope/lr0.003/seed0")
    assert [s.run_id for s in study.plan()] == sweep
    # Once slope's sweep has finished: its refine lrs on the other seeds (seed 0's are the
    # sweep's runs); the variant waits for the choice.
    refining = {"slope": LrChoice(refine=(1e-3, 3e-3))}
    assert [s.run_id for s in study.plan(refining)] == [
        *sweep,
        "slope/lr0.001/seed1",
        "slope/lr0.003/seed1",
        "slope/lr0.001/seed2",
        "slope/lr0.003/seed2",
    ]
    # Once slope's lr is chosen: its variant on every seed at that lr.
    chosen = {"slope": LrChoice(refine=(1e-3, 3e-3), chosen=3e-3), "dense": LrChoice()}
    plan = [s.run_id for s in study.plan(chosen)]
    assert [r for r in plan if r.startswith("variant")] == [
        f"variant/lr0.003/seed{seed}" for seed in (0, 1, 2)
    ]
    full_choices = {**chosen, "dense": LrChoice(refine=(1e-3, 3e-3), chosen=1e-3)}
    full = study.plan(full_choices)
    assert len(full) == study.planned_count(full_choices) == len({s.run_id for s in full})
    assert "ablation/lr0.001/seed0" in [s.run_id for s in full]
    variant = next(s for s in full if s.method == "variant")
    assert "--model.sparsity.n=1" in variant.args and "--model.optimizer.lr=0.003" in variant.args
    # A best lr whose neighbours both diverged refines alone: fewer runs planned.
    alone = {**full_choices, "dense": LrChoice(refine=(1e-3,), chosen=1e-3)}
    assert study.planned_count(alone) == study.planned_count(full_choices) - 2


def test_study_callbacks_replace_the_base_configs_and_a_method_adds_its_own(
    tmp_path: Path,
) -> None:
    guard = {"class_path": "slope_lightning.callbacks.NonFiniteGuard"}
    scheduler = {
        "class_path": "slope_lightning.callbacks.MaskScheduler",
        "init_args": {"every": 10},
    }
    study = StudyConfig.from_dict(
        _study(
            tmp_path,
            callbacks=[guard],
            methods={
                "dense": {"lrs": [1e-3]},
                "slope": {"lrs": [1e-3], "callbacks": [scheduler]},
            },
        )
    )

    def callbacks(method: str) -> list[dict[str, Any]]:
        spec = next(s for s in study.plan() if s.method == method)
        (argument,) = [a for a in spec.args if a.startswith("--trainer.callbacks=")]
        return list(json.loads(argument.split("=", 1)[1]))

    assert callbacks("dense") == [guard]
    assert callbacks("slope") == [guard, scheduler]
    no_common = StudyConfig.from_dict(_study(tmp_path))  # the base config's callbacks stay
    assert not any(a.startswith("--trainer.callbacks") for s in no_common.plan() for a in s.args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"runs": 3}, r"unknown key\(s\) \['runs'\]"),
        ({"name": "a b"}, "name must be a non-empty name of letters"),
        ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct integers"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"methods": {}}, "methods must map each method's name"),
        ({"methods": {"d": {"lrs": []}}}, r"methods.d.lrs must be a non-empty list"),
        ({"methods": {"d": {"lrs": [-1.0]}}}, r"methods.d.lrs must be a non-empty list"),
        ({"methods": {"d": {"lrs": [1e-3], "lr": 1}}}, r"methods.d: unknown key\(s\) \['lr'\]"),
        (
            {"methods": {"d": {"lrs": [1e-3], "args": ["--seed_everything=3"]}}},
            "sets seed_everything, which the study sets for each run",
        ),
        ({"common": ["--model.optimizer.lr=1"]}, "sets model.optimizer.lr"),
        ({"common": "--trainer.max_steps=3"}, "common must be a list of fit arguments"),
        ({"baseline": "sparse"}, "baseline 'sparse' is not one of the methods"),
        ({"eval_windows": 0}, "eval_windows must be a positive integer"),
        ({"sweep_seeds": [3]}, r"sweep_seeds \[3\] must be a subset of seeds \[0, 1\]"),
        (
            {"methods": {"d": {"lrs": [1e-3], "lr_from": "d"}}},
            "give either lrs .* or lr_from .*, not both",
        ),
        (
            {"methods": {"d": {"lrs": [1e-3]}, "v": {"lr_from": "x"}}},
            r"methods.v.lr_from: 'x' is not a method with its own lrs; choose one of \['d'\]",
        ),
        (
            {"methods": {"d": {"lrs": [1e-3]}, "v": {"lr_from": "d", "group": "extra"}}},
            "methods.v.group must be 'method' or 'ablation'",
        ),
        (
            {"methods": {"d": {"lrs": [1e-3], "seeds": [1]}}},
            r"methods.d.seeds must include the sweep seeds",
        ),
        (
            {"methods": {"d": {"lrs": [1e-3], "callbacks": [{"init_args": {}}]}}},
            "methods.d.callbacks must be a list of callbacks, each a mapping with class_path",
        ),
        ({"common": ["--trainer.callbacks=[]"]}, "sets trainer.callbacks"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(StudyConfigError, match=message):
        StudyConfig.from_dict(_study(tmp_path, **change))


def test_a_study_file_extends_another_and_updates_its_methods(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_study(tmp_path)))
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "big.yaml").write_text(
        yaml.safe_dump(
            {
                "extends": "../base.yaml",
                "name": "big",
                "methods": {"slope": {"lrs": [1e-4, 2e-4]}, "extra": {"lr_from": "slope"}},
            }
        )
    )
    study = StudyConfig.from_file(tmp_path / "gpu" / "big.yaml")
    assert study.name == "big" and study.seeds == (0, 1)
    slope = study.method("slope")
    assert slope.lrs == (1e-4, 2e-4) and slope.label == "SLoPe 2:4"  # only lrs replaced
    assert study.method("dense").lrs == (1e-3, 3e-3)
    assert study.method("extra").lr_from == "slope"
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(StudyConfigError, match="makes a cycle"):
        StudyConfig.from_file(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: absent.yaml\n")
    with pytest.raises(StudyConfigError, match="relative to the extending file"):
        StudyConfig.from_file(tmp_path / "orphan.yaml")


def test_missing_or_non_mapping_study_file(tmp_path: Path) -> None:
    with pytest.raises(StudyConfigError, match="does not exist"):
        StudyConfig.from_file(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(StudyConfigError, match="must hold a mapping"):
        StudyConfig.from_file(tmp_path / "list.yaml")
    (tmp_path / "short.yaml").write_text("name: x\n")
    with pytest.raises(StudyConfigError, match="missing key 'base_config'"):
        StudyConfig.from_file(tmp_path / "short.yaml")


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_parse_and_every_method_is_a_valid_fit(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert path.read_text().startswith("#"), "a study file opens with a comment saying what it is"
    monkeypatch.chdir(ROOT)
    study = StudyConfig.from_file(path)
    if path.stem in FAIR_STUDIES:  # the method comparisons: tuned per method, several seeds
        assert len(study.seeds) >= 3 and all(len(m.lrs) >= 3 for m in study.methods if m.swept)
    choices = {m.name: LrChoice(m.lrs[:2], m.lrs[0]) for m in study.methods if m.swept}
    plan = study.plan(choices)
    assert len(plan) == study.planned_count(choices)
    for method in study.methods:
        spec = next(s for s in plan if s.method == method.name)
        assert main([*spec.args, "--print_config"]) == 0  # the CLI accepts the run as given
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["optimizer"]["lr"] == spec.lr
        assert printed["seed_everything"] == spec.seed
        assert printed["trainer"]["logger"]["init_args"]["name"] == spec.run_id


# ---------------------------------------------------------------------------------------------
# The runner, with a fake fit
# ---------------------------------------------------------------------------------------------


class FakeFit:
    """A launcher that does what a fit leaves behind: ``version_0`` with ``config.yaml``,
    TensorBoard scalars and ``checkpoints/last.ckpt``. ``outcomes`` maps a run id to the
    (exit status, error line) it ends with (default: success)."""

    def __init__(self, outcomes: dict[str, tuple[int, str | None]] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], log_file: Path) -> LaunchResult:
        from torch.utils.tensorboard import SummaryWriter

        self.calls.append(args)
        root = log_file.parent
        run_id = "/".join(root.parts[-3:])
        lr = float(next(a for a in args if a.startswith("--model.optimizer.lr="))[21:])
        seed = int(next(a for a in args if a.startswith("--seed_everything="))[18:])
        version = root / "version_0"
        (version / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {
            "trainer": {"max_steps": 4, "devices": 1},
            "data": {"batch_size": 2, "seq_len": 8, "test_fraction": 0.05},
            "model": {"preset": "tiny"},
        }
        (version / "config.yaml").write_text(yaml.safe_dump(config))
        writer = SummaryWriter(str(version))
        sparse = "--model.sparsity.sparse=false" not in args
        for step in range(4):  # a loss that depends on lr, seed and method, deterministically
            loss = 6.0 - step * 0.1 - abs(math.log10(lr) + 2.7) * -0.2 + 0.01 * seed + 0.05 * sparse
            writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("val/ppl", math.exp(loss), 3)
        writer.close()
        torch.save({"global_step": 4}, version / "checkpoints" / "last.ckpt")
        code, error = self.outcomes.get(run_id, (0, None))
        return LaunchResult(code, error)


class FakeEvaluator:
    def evaluate(
        self, export_dir: Path, config: dict[str, Any], split: str = "validation"
    ) -> dict[str, Any]:
        loss = 5.0 if split == "validation" else 5.5
        return {
            "loss": loss,
            "ppl": math.exp(loss),
            "windows": 4,
            "of_windows": 4,
            "tokens": 32,
            "per_source": {"a": {"loss": loss, "ppl": math.exp(loss), "tokens": 32}},
            "parameters": 1000,
        }


def test_finished_runs_are_never_run_again_and_failures_are_retried(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(_study(tmp_path))
    fake = FakeFit(
        {
            "dense/lr0.003/seed1": (1, "error: something broke  [SLOPE_LIGHTNING_DEBUG=1 ...]"),
            "slope/lr0.003/seed0": (1, "error: non-finite loss at global step 3; resume ..."),
        }
    )
    outcomes = run_study(study, fake, FakeEvaluator())  # type: ignore[arg-type]
    states = {o.spec.run_id: o.state for o in outcomes}
    assert states["dense/lr0.003/seed1"] == "failed"
    assert states["slope/lr0.003/seed0"] == "diverged"
    assert sum(state == "finished" for state in states.values()) == 6
    assert len(fake.calls) == 8
    diverged = read_marker(next(s for s in study.plan() if s.run_id == "slope/lr0.003/seed0"))
    assert diverged is not None and diverged["status"] == "diverged" and diverged["eval"] is None
    finished = read_marker(study.plan()[0])
    assert finished is not None
    assert finished["tokens"] == 4 * 2 * 8 and finished["eval"]["ppl"] == pytest.approx(math.exp(5))
    assert finished["test_eval"]["ppl"] == pytest.approx(math.exp(5.5))  # the held-out split
    assert [step for step, _ in finished["curves"]["train/loss"]] == [0, 1, 2, 3]
    assert len(list(finished_results(study))) == 7

    # Again: only the failed run is launched, and it resumes from its checkpoint.
    again = FakeFit()
    outcomes = run_study(study, again, FakeEvaluator())  # type: ignore[arg-type]
    assert [call[-1] for call in again.calls] == ["--ckpt_path=last"]
    assert sum(o.state == "done" for o in outcomes) == 7
    assert len(list(finished_results(study))) == 8


def test_an_attempt_without_checkpoint_starts_afresh(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(_study(tmp_path, seeds=[0], sweep_seeds=[0]))
    spec = study.plan()[0]
    (spec.root / "version_0").mkdir(parents=True)
    (spec.root / "version_0" / "stale.txt").write_text("from an attempt that died early")
    fake = FakeFit()
    run_study(study, fake, FakeEvaluator())  # type: ignore[arg-type]
    assert "--ckpt_path=last" not in fake.calls[0]
    assert not (spec.root / "version_0" / "stale.txt").exists()


def test_an_interrupted_run_stops_the_study(tmp_path: Path) -> None:
    study = StudyConfig.from_dict(_study(tmp_path))
    fake = FakeFit({"dense/lr0.003/seed0": (130, "error: interrupted")})
    with pytest.raises(KeyboardInterrupt, match="run the study again to resume"):
        run_study(study, fake, FakeEvaluator())  # type: ignore[arg-type]
    assert len(fake.calls) == 2


def test_a_marker_of_other_arguments_is_refused(tmp_path: Path) -> None:
    data = _study(tmp_path, seeds=[0], sweep_seeds=[0])
    run_study(StudyConfig.from_dict(data), FakeFit(), FakeEvaluator())  # type: ignore[arg-type]
    data["common"] = ["--trainer.max_steps=8"]
    with pytest.raises(StaleRunError, match="other fit arguments than the study now gives"):
        run_study(StudyConfig.from_dict(data), FakeFit(), FakeEvaluator())  # type: ignore[arg-type]


def test_a_study_continues_from_its_committed_records_without_its_run_folders(
    tmp_path: Path,
) -> None:
    """With ``records_dir`` every finished run leaves a small record (the file to commit); on
    another machine (no run folders at all) those runs count as finished and are never run
    again, and the report is made from the records alone."""
    data = _study(tmp_path, seeds=[0], sweep_seeds=[0], records_dir=str(tmp_path / "records"))
    study = StudyConfig.from_dict(data)
    first = FakeFit({"slope/lr0.001/seed0": (1, "error: something broke")})
    run_study(study, first, FakeEvaluator())  # type: ignore[arg-type]
    records = sorted(p.relative_to(tmp_path / "records") for p in tmp_path.glob("records/*/*/*"))
    assert [str(p) for p in records] == [
        "dense/lr0.001/seed0.json",
        "dense/lr0.003/seed0.json",
        "slope/lr0.003/seed0.json",
    ]
    record = json.loads((tmp_path / "records" / "dense" / "lr0.001" / "seed0.json").read_text())
    assert record == read_marker(study.plan()[0])  # the marker itself

    shutil.rmtree(tmp_path / "runs")  # the next session: only what was committed
    again = FakeFit()
    outcomes = run_study(study, again, FakeEvaluator())  # type: ignore[arg-type]
    assert len(again.calls) == 1  # only the failed run, afresh (its folder is gone)
    assert (
        "--model.optimizer.lr=0.001" in again.calls[0] and "--ckpt_path=last" not in again.calls[0]
    )
    assert [o.spec.run_id for o in outcomes if o.state == "finished"] == ["slope/lr0.001/seed0"]
    assert len(finished_results(study)) == 4
    assert (tmp_path / "records" / "slope" / "lr0.001" / "seed0.json").is_file()

    # A record made with other arguments is refused, naming both places to delete.
    data["common"] = ["--trainer.max_steps=8"]
    with pytest.raises(StaleRunError, match=r"delete .*runs.* and .*records"):
        finished_results(StudyConfig.from_dict(data))


def test_runs_finished_before_the_study_kept_records_get_one(tmp_path: Path) -> None:
    data = _study(tmp_path, seeds=[0], sweep_seeds=[0])
    run_study(StudyConfig.from_dict(data), FakeFit(), FakeEvaluator())  # type: ignore[arg-type]
    data["records_dir"] = str(tmp_path / "records")
    nothing = FakeFit()
    run_study(StudyConfig.from_dict(data), nothing, FakeEvaluator())  # type: ignore[arg-type]
    assert nothing.calls == [] and len(list((tmp_path / "records").glob("*/*/*.json"))) == 4


def test_in_process_launcher_captures_the_error_line(tmp_path: Path) -> None:
    def failing_main(args: list[str]) -> int:
        print("error: model.preset: unknown preset 'x'", file=sys.stderr)
        return 2

    result = in_process_launcher(failing_main)(["fit"], tmp_path / "fit.log")
    assert result == LaunchResult(2, "error: model.preset: unknown preset 'x'")
    assert "unknown preset" in (tmp_path / "fit.log").read_text()


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_cli_study_errors_and_dry_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--config", "absent.yaml"]) == 2
    assert "error: study file 'absent.yaml' does not exist" in capsys.readouterr().err
    assert main(["study", "--config", "absent.yaml", "--bogus"]) == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments ['--bogus']" in error
    assert error.count("--help lists the accepted options") == 1
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(_study(tmp_path)))
    assert main(["study", "--config", "study.yaml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all("to run" in line for line in lines)
    assert main(["study", "--help"]) == 0


# ---------------------------------------------------------------------------------------------
# The real thing
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiny_study_runs_resumes_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 methods × 2 lrs of a 1-layer model for 4 steps, in-process: the sweep on seed 0, the
    refine (both lrs of a 2-lr grid) on seed 1; run again, only a deleted run is run again;
    the report is written, on the held-out test split."""
    monkeypatch.chdir(tmp_path)
    sources = write_corpus(tmp_path / "docs", documents=8, words=400)
    data = _study(
        tmp_path,
        sweep_seeds=[0],
        eval_windows=16,
        common=[
            f"--data.sources=[{sources}]",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.vocab_size=300",
            "--data.seq_len=16",
            "--data.batch_size=2",
            "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_model_summary=false",
        ],
    )
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    assert main(["study", "--config", "study.yaml", "--in-process"]) == 0
    study = StudyConfig.from_file(tmp_path / "study.yaml")
    results = {f"{r['method']}/{r['lr']:g}/{r['seed']}": r for r in finished_results(study)}
    assert len(results) == 8 and all(r["status"] == "finished" for r in results.values())
    for r in results.values():
        assert r["tokens"] == 4 * 2 * 16 and r["eval"]["windows"] == 16
        assert r["eval"]["ppl"] > 1 and math.isfinite(r["eval"]["ppl"])
        assert r["test_eval"]["split"] == "test" and math.isfinite(r["test_eval"]["ppl"])
        assert r["test_eval"]["ppl"] != r["eval"]["ppl"]  # other documents
        assert (Path(r["log_dir"]) / "export" / "model.safetensors").is_file()

    def first_loss(key: str) -> float:
        return results[key]["curves"]["train/loss"][0][1]

    # A seed is one initialisation and one data order: the first step's loss (before any
    # update) is the same at every lr of a method, and differs between seeds.
    for method in ("dense", "slope"):
        assert first_loss(f"{method}/0.001/0") == first_loss(f"{method}/0.003/0")
        assert first_loss(f"{method}/0.001/0") != first_loss(f"{method}/0.001/1")
    report = tmp_path / "report"
    assert {p.name for p in report.iterdir()} == {
        "demo.md",
        "demo.json",
        "demo-lr.png",
        "demo-curves.png",
        "demo-gap.png",  # SLoPe over dense at each validation point, paired by seed
    }
    summary = json.loads((report / "demo.json").read_text())
    assert summary["split"] == "test" and "**Test split.**" in (report / "demo.md").read_text()
    assert summary["complete"] and {row["method"] for row in summary["table"]} == {"dense", "slope"}

    # Run again: nothing is launched. Delete one run: only it runs again.
    calls: list[list[str]] = []

    def counting(args: list[str]) -> int:
        calls.append(args)
        return main(args)

    launcher = in_process_launcher(counting)
    run_study(study, launcher)
    assert calls == []
    victim = study.plan(choose(study, finished_results(study)))[5]
    marker = json.loads(victim.marker.read_text())
    shutil.rmtree(victim.root)
    run_study(study, launcher)
    assert len(calls) == 1 and calls[0] == list(victim.args)
    rerun = json.loads(victim.marker.read_text())
    assert rerun["eval"]["ppl"] == pytest.approx(marker["eval"]["ppl"], rel=1e-6)  # reproducible


def test_the_console_script_plans_the_shipped_study(tmp_path: Path) -> None:
    """``slope-lightning study --dry-run`` as a user types it: exit 0, the sweep listed as
    runs to do, the runs that wait for it counted; a missing file is exit 2."""
    import subprocess

    command = [sys.executable, "-m", "slope_lightning.cli", "study"]
    config = str(ROOT / "configs" / "studies" / "tiny.yaml")
    done = subprocess.run(
        [*command, "--config", config, "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("dense/lr0.0005/seed0") and "to run" in lines[0]
    study = StudyConfig.from_file(config)
    assert len(lines) == len(study.plan()) + 1
    assert lines[-1] == (
        f"and {study.planned_count() - len(study.plan())} more runs at learning rates that "
        "the sweep and refine stages will choose"
    )
    missing = subprocess.run(
        [*command, "--config", "absent.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2 and "error: study file 'absent.yaml' does not exist" in (
        missing.stderr
    )
