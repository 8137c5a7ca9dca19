"""The `slope-lightning` command: configs, exit status, errors, explicit resume, safe loads.

In-process runs go through ``run_cli`` (exceptions) or ``main`` (exit status and the
``error:`` line); the console script itself is run as a subprocess for the exit status. Every
fit uses a tiny model on a tiny generated corpus (a few seconds at most).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from console import console, error_line
from lightning_helpers import write_corpus
from slope_lightning.bench.runs import summarise
from slope_lightning.checkpoints import CheckpointError, checkpoint_step
from slope_lightning.cli import ConfigError, SLoPeCLI, TrainingInterrupted, main, run_cli

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it sees pytest's own arguments beside ``args``."""
    monkeypatch.setattr(sys, "argv", ["slope-lightning"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny corpus and a token cache shared by the module's runs (one tokenizer)."""
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "docs", documents=8, words=400), str(root / "cache")


def _args(corpus: tuple[str, str], *extra: str, steps: int = 4) -> list[str]:
    sources, cache = corpus
    return [
        "fit",
        "--config",
        TINY,
        f"--data.sources=[{sources}]",
        f"--data.cache_dir={cache}",
        "--data.vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=2",
        "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config), "--print_config"]) == 0


def test_configs_are_documented_yaml():
    for config in CONFIGS:
        text = config.read_text()
        assert text.startswith("#"), f"{config.name} should open with a comment saying what it is"
        yaml.safe_load(text)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_configs_keep_each_run_apart_and_guard_against_faults(config):
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    by_class = {c["class_path"]: c.get("init_args") or {} for c in callbacks}
    # Lightning auto-resumes every fit when an OnExceptionCheckpoint is present.
    assert "lightning.pytorch.callbacks.OnExceptionCheckpoint" not in by_class
    assert "slope_lightning.callbacks.CrashCheckpoint" in by_class
    assert "slope_lightning.callbacks.NonFiniteGuard" in by_class
    for name in (
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "slope_lightning.callbacks.CrashCheckpoint",
    ):
        assert by_class[name].get("dirpath") is None, f"{name}: checkpoints must live per run"


# --------------------------------------------------------------------------------------------
# Exit status of the real console script (item 3)
# --------------------------------------------------------------------------------------------


def test_console_script_exits_0_after_a_successful_fit(corpus, tmp_path):
    result = console(*_args(corpus, steps=2), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SLoPeCLI object" not in result.stdout + result.stderr
    assert (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_console_script_exits_non_zero_with_one_error_line(corpus, tmp_path):
    # The other failures (exit 1 included) go through the same main(), in-process below.
    bad_override = console(*_args(corpus, "--trainer.max_stepz=3"), cwd=tmp_path)
    assert bad_override.returncode == 2
    line = error_line(bad_override.stderr)
    assert "max_stepz" in line and "--help" in line


# --------------------------------------------------------------------------------------------
# Bad input: one `error:` line naming the problem and the fix, the right exit status
# --------------------------------------------------------------------------------------------

BAD_INPUT = {
    "unknown key": (["--trainer.max_stepz=3"], 2, ["max_stepz", "--help"]),
    "bad choice": (["--model.sparsity.backend=fastest"], 2, ["model.sparsity.backend", "fastest"]),
    "bad type": (["--trainer.max_steps=many"], 2, ["max_steps", "many"]),
    "missing config": (["--config=missing.yaml"], 2, ["missing.yaml", "does not exist"]),
    "unsafe loading asked": (["--weights_only=false"], 2, ["--weights_only false", "drop it"]),
    "missing checkpoint": (["--ckpt_path=gone.ckpt"], 1, ["gone.ckpt does not exist", "`last`"]),
    "best is not a file": (["--ckpt_path=best"], 1, ["best does not exist", "`last`"]),
    "nothing to resume": (
        ["--ckpt_path=last"],
        2,
        ["no checkpoint to resume", "runs/tiny/version_*", "without --ckpt_path"],
    ),
    "seq_len set twice": (
        ["--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1, seq_len: 64}"],
        2,
        ["model.model_overrides.seq_len=64", "data.seq_len=16", "set data.seq_len instead"],
    ),
    "vocab_size set twice": (
        ["--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, vocab_size: 512}"],
        2,
        ["model.model_overrides.vocab_size=512", "data.vocab_size=300", "drop vocab_size"],
    ),
    "linked key set directly": (
        ["--model.seq_len=64"],
        2,
        ["model.seq_len is set from data.seq_len", "set data.seq_len instead"],
    ),
    "auto-resuming callback": (
        [
            "--trainer.callbacks+=lightning.pytorch.callbacks.OnExceptionCheckpoint",
            "--trainer.callbacks.dirpath=crash",
        ],
        2,
        ["OnExceptionCheckpoint makes Lightning resume every fit", "CrashCheckpoint instead"],
    ),
    "indivisible m": (
        ["--model.sparsity.m=3"],
        2,
        ["no layer could be made 2:3 sparse", "divisible by m=3", "m=4"],
    ),
    "bad lr": (["--model.optimizer.lr=-1"], 2, ["model.optimizer.lr", "-1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_fails_with_one_line(case, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra, status, needles = BAD_INPUT[case]
    args = _args(corpus, *extra)
    if extra[0].startswith("--config="):
        args[args.index("--config") + 1] = extra[0].split("=", 1)[1]
        args.remove(extra[0])
    assert main(args) == status
    line = error_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line, line


def test_predict_is_not_offered(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--config", TINY]) == 2
    line = error_line(capsys.readouterr().err)
    assert "'predict'" in line and "fit" in line and "validate" in line and "test" in line
    assert set(SLoPeCLI.subcommands()) == {"fit", "validate", "test"}
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "validate" in usage and "predict" not in usage


def test_validate_needs_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--config", TINY]) == 2
    assert "--ckpt_path" in error_line(capsys.readouterr().err)


def test_a_bug_keeps_its_traceback(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def broken(self: SLoPeCLI, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(SLoPeCLI, "fit", broken)
    with pytest.raises(ZeroDivisionError):
        main(_args(corpus))


def test_debug_env_shows_the_traceback_of_user_errors(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLOPE_LIGHTNING_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(_args(corpus, "--ckpt_path=gone.ckpt"))


# --------------------------------------------------------------------------------------------
# Runs are separate; resuming is explicit (item 9); checkpoints load safely (item 7)
# --------------------------------------------------------------------------------------------


def test_a_plain_fit_is_a_new_run_and_never_resumes(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_cli(_args(corpus, steps=2)).trainer
    assert first.global_step == 2
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    second = run_cli(_args(corpus, steps=2)).trainer
    assert second.ckpt_path is None and second.global_step == 2  # trained from step 0
    assert Path(second.log_dir).name == "version_1"
    assert (Path(second.log_dir) / "checkpoints" / "last.ckpt").is_file()
    assert last.stat().st_mtime_ns == stamp  # the first run's files are untouched


def test_a_new_run_refuses_a_checkpoint_dir_holding_another_runs_files(
    corpus, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared"
    (shared / "last.ckpt").parent.mkdir()
    torch.save({"global_step": 1}, shared / "last.ckpt")
    config = yaml.safe_load(Path(TINY).read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(shared)
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(yaml.safe_dump(config))
    args = _args(corpus)
    args[args.index("--config") + 1] = str(fixed)
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "already holds checkpoints of an earlier run" in line and "Remove dirpath" in line


def test_resume_last_continues_the_latest_run_and_says_so(corpus, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    run_cli(_args(corpus, steps=4))  # version_0
    run_cli(_args(corpus, steps=2))  # version_1: the latest run
    with caplog.at_level("INFO", logger="slope_lightning.cli"):
        trainer = run_cli(_args(corpus, "--ckpt_path=last", steps=4)).trainer
    expected = tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    assert Path(trainer.ckpt_path).resolve() == expected.resolve()
    assert trainer.global_step == 4 and Path(trainer.log_dir).name == "version_1"
    assert f"resuming from {Path('runs/tiny/version_1/checkpoints/last.ckpt')}" in caplog.text
    assert "global step 2" in caplog.text
    assert checkpoint_step(expected) == 4


def test_resume_refuses_a_pickle_payload_as_last_ckpt(corpus, tmp_path, monkeypatch, capsys):
    from test_faults import _payload_checkpoint

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    _payload_checkpoint(tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt", marker)
    assert main(_args(corpus, "--ckpt_path=last")) == 1
    line = error_line(capsys.readouterr().err)
    assert "refusing to load checkpoint" in line and "last.ckpt" in line and "trust" in line
    assert not marker.exists()


def test_resume_reports_a_corrupt_checkpoint_by_name(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(_args(corpus, steps=2))
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        run_cli(_args(corpus, "--ckpt_path=last"))
    assert "last.ckpt" in str(info.value)


def test_validate_evaluates_the_latest_checkpoint(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(_args(corpus, steps=2))
    args = _args(corpus, "--ckpt_path=last")
    args[0] = "validate"
    args = [a for a in args if not a.startswith(("--trainer.max_steps", "--trainer.val_check"))]
    trainer = run_cli(args).trainer
    assert trainer.ckpt_path.endswith("version_0/checkpoints/last.ckpt")
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


class _PoisonWeights(pl.Callback):
    """A NaN in one weight after a step: the next loss is NaN (a diverged run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.blocks[0].attn_norm.parameters()).fill_(float("nan"))


def test_a_nan_stops_the_cli_run_naming_the_step_and_exports_nothing(
    corpus, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _with_callbacks(monkeypatch, [_PoisonWeights(step=2)])
    assert main(_args(corpus, steps=4)) == 1
    line = error_line(capsys.readouterr().err)
    assert "non-finite loss at global step 2" in line and "lr" in line
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    assert not (run_dir / "export").exists()
    assert not (run_dir / "crash" / "on_exception.ckpt").exists()  # weights were not finite
    last = run_dir / "checkpoints" / "last.ckpt"  # the step-2 checkpoint, before the NaN
    assert not last.exists() or checkpoint_step(last) <= 2


class _DiskFull(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_fails_with_one_line_and_keeps_the_checkpoints(
    corpus, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _with_callbacks(monkeypatch, [_DiskFull()])
    assert main(_args(corpus, steps=4)) == 1
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "free disk space" in line
    assert "--ckpt_path last" in line
    # The crash checkpoint (step 3) was written before the error reached main().
    crash = tmp_path / "runs/tiny/version_0/crash/on_exception.ckpt"
    assert checkpoint_step(crash) == 3


def test_trainer_loads_go_through_safe_checkpoint_io(corpus, tmp_path, monkeypatch):
    from slope_lightning.checkpoints import SafeCheckpointIO

    monkeypatch.chdir(tmp_path)
    cli = run_cli(_args(corpus, steps=1))
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)


# --------------------------------------------------------------------------------------------
# Resume after an interrupt (item 11): the same logged steps and validations
# --------------------------------------------------------------------------------------------


class _Interrupt(pl.Callback):
    """Ctrl-C at a global step, in a given place of the loop."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def _maybe(self, trainer: pl.Trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not trainer.sanity_checking:
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "between batches")

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "in backward")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "after the step")

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "in validation")


class _Recorder(pl.Callback):
    """The global steps at which validation started."""

    def __init__(self) -> None:
        self.validated_at: list[int] = []

    def on_validation_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.validated_at.append(trainer.global_step)


def _with_callbacks(monkeypatch: pytest.MonkeyPatch, callbacks: list[pl.Callback]) -> None:
    original = SLoPeCLI.instantiate_trainer

    def instantiate(self: SLoPeCLI, **kwargs: Any) -> pl.Trainer:
        trainer = original(self, **kwargs)
        trainer.callbacks[:0] = callbacks
        return trainer

    monkeypatch.setattr(SLoPeCLI, "instantiate_trainer", instantiate)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in ("train/loss", "val/loss"):
            if tag in accumulator.Tags()["scalars"]:
                found.setdefault(tag, []).extend(
                    (e.step, round(e.value, 5)) for e in accumulator.Scalars(tag)
                )
    return found


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> tuple[dict, list[int]]:
    """Logged scalars and validation steps of a 6-step run without interruption."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["slope-lightning"])
        recorder = _Recorder()
        _with_callbacks(patch, [recorder])
        trainer = run_cli(_args(corpus, "--trainer.val_check_interval=3", steps=6)).trainer
        return _scalars(Path(trainer.log_dir)), recorder.validated_at


@pytest.mark.parametrize(
    ("where", "step"),
    [
        ("between batches", 4),
        ("in backward", 4),
        ("after the step", 2),
        ("after the step", 3),  # before the validation due at step 3
        ("in validation", 3),
    ],
)
def test_resume_after_an_interrupt_logs_and_validates_like_an_uninterrupted_run(
    where, step, corpus, uninterrupted, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = _args(corpus, "--trainer.val_check_interval=3", steps=6)
    first, second = _Recorder(), _Recorder()
    with monkeypatch.context() as patch:
        _with_callbacks(patch, [first, _Interrupt(step, where)])
        with pytest.raises(TrainingInterrupted, match=f"interrupted at global step {step}") as info:
            run_cli(args)
    assert "crash checkpoint: runs/tiny/version_0/crash/on_exception.ckpt" in str(info.value)
    with monkeypatch.context() as patch:
        _with_callbacks(patch, [second])
        trainer = run_cli([*args, "--ckpt_path=last"]).trainer
    assert trainer.ckpt_path.endswith("on_exception.ckpt") and trainer.global_step == 6
    scalars, validated_at = uninterrupted
    assert _scalars(Path(trainer.log_dir)) == scalars  # same steps, same values
    interrupted_validation = [step] if where == "in validation" else []
    assert sorted(first.validated_at + second.validated_at) == sorted(
        validated_at + interrupted_validation
    )
    assert not (Path(trainer.log_dir) / "crash" / "on_exception.ckpt").exists()


# --------------------------------------------------------------------------------------------
# The full run (the README's quickstart, shrunk)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_runs_end_to_end_and_resumes_from_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = write_corpus(tmp_path / "docs")
    args = [
        "fit",
        "--config",
        TINY,
        f"--data.sources=[{sources}]",
        "--data.vocab_size=300",
        "--data.seq_len=32",
        "--data.batch_size=4",
        "--model.model_overrides={n_layer: 1, d_model: 64, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
    ]
    cli = run_cli(args)
    trainer = cli.trainer
    assert trainer.global_step == 6
    assert float(trainer.callback_metrics["val/ppl"]) > 1.0
    run_dir = Path(trainer.log_dir)
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, "TensorBoard event file missing"
    tags = _tensorboard_tags(events[0])
    for tag in (
        "train/loss",
        "val/loss",
        "val/ppl",
        "lr-AdamW",
        "train/device/items_per_sec",
        "memory/total_MiB",
        "sparsity/wrc_kept_fraction",
        "sparsity/mc_flipped",
        "adapters/R_norm",
    ):
        assert any(t.startswith(tag) for t in tags), f"{tag} not logged; have {sorted(tags)}"
    summary = summarise(run_dir)  # the benchmark that builds the README's results table
    assert summary["method"] == "SLoPe" and summary["steps"] == 6
    assert summary["val_ppl"] == pytest.approx(float(trainer.callback_metrics["val/ppl"]))
    assert summary["model_state_MiB"] > 0
    # Resume from `last` and train further, in the same run directory.
    resumed = run_cli([*args, "--trainer.max_steps=8", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 8
    assert resumed.trainer.ckpt_path.endswith("last.ckpt")
    assert Path(resumed.trainer.log_dir) == run_dir


def _tensorboard_tags(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_run_cli_raises_instead_of_exiting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="validate needs"):
        run_cli(["validate", "--config", TINY])


def test_a_corrupt_token_cache_is_one_error_line_naming_the_folder(corpus, tmp_path, capsys):
    sources, _ = corpus
    cache = tmp_path / "cache"
    args = _args((sources, str(cache)), steps=1)
    assert main(args) == 0  # builds this test's own cache
    capsys.readouterr()
    (train,) = cache.glob("tokens/*/train.bin")
    train.write_bytes(train.read_bytes()[:-7])  # truncated, e.g. by a full disk
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "truncated" in line and str(train.parent) in line
