"""The front door of ``slope-lightning``, through the real console script as a subprocess:
one command tree, config errors in the rejecting code's words with exit 2, one version
directory per run even when runs start at the same moment, a held-out test split, and
advice that applies to the command that failed.

Every fit uses a one-layer model on a tiny generated corpus (a few seconds each).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console import console, error_line
from lightning_helpers import write_corpus
from slope_lightning.cli import SUBCOMMANDS

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LIGHTNING_ARGS_WARNING = "args parameter is intended to run from within Python"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny corpus and a token cache shared by the module's runs (one tokenizer)."""
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "docs", documents=8, words=400), str(root / "cache")


def _options(corpus: tuple[str, str], *extra: str, config: Path = TINY) -> list[str]:
    sources, cache = corpus
    return [
        "--config",
        str(config),
        f"--data.sources=[{sources}]",
        f"--data.cache_dir={cache}",
        "--data.vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=2",
        "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# One command tree
# --------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand_with_one_line_and_no_warning(tmp_path):
    result = console("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == {"fit", "validate", "test", "generate", "study", "bench", "fetch"}
    assert LIGHTNING_ARGS_WARNING not in result.stderr


@pytest.mark.parametrize("subcommand", list(SUBCOMMANDS))
def test_every_subcommand_has_help(subcommand, tmp_path):
    result = console(subcommand, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout.lower()
    assert LIGHTNING_ARGS_WARNING not in result.stderr


def test_an_unknown_subcommand_names_the_closest_and_exits_2(tmp_path):
    result = console("fitt", "--config", str(TINY), cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "'fitt'" in line and "did you mean 'fit'" in line and "bench" in line


# --------------------------------------------------------------------------------------------
# Config errors: the rejecting code's words, the key, exit 2
# --------------------------------------------------------------------------------------------


def _broken_config(tmp_path: Path, old: str, new: str) -> Path:
    text = TINY.read_text()
    assert old in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_a_callback_argument_rejected_in_a_yaml_config_names_class_and_argument(corpus, tmp_path):
    config = _broken_config(tmp_path, "start: 0.99 ", "start: 1.5  ")
    result = console("fit", *_options(corpus, config=config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert "trainer.callbacks" in line and "LazyLoRA(start=1.5)" in line
    assert "must lie in [0, 1)" in line  # LazyLoRA's own words
    assert "implicit class_path" not in line


def test_a_class_path_typo_names_the_bad_path_and_the_closest_importable_one(corpus, tmp_path):
    config = _broken_config(tmp_path, "callbacks.MaskScheduler", "callbacks.MaskSchedulr")
    result = console("fit", *_options(corpus, config=config), cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "'slope_lightning.callbacks.MaskSchedulr'" in line
    assert "closest importable one is 'slope_lightning.callbacks.MaskScheduler'" in line


REJECTED_AFTER_PARSING = {
    "negative lr": ("--model.optimizer.lr=-1", ["model.optimizer.lr", "-1"]),
    "vocabulary of 0": ("--data.vocab_size=0", ["data", "vocab_size", "got 0"]),
    "n not below m": ("--model.sparsity.n=5", ["model.sparsity.n", "5:4"]),
    "unknown preset": ("--model.preset=tinyy", ["model.preset", "'tinyy'", "known presets"]),
    "batch size 0": ("--data.batch_size=0", ["data", "batch_size", "got 0"]),
    "negative max_steps": ("--trainer.max_steps=-5", ["trainer", "max_steps", "-5"]),
}


@pytest.mark.parametrize("case", list(REJECTED_AFTER_PARSING))
def test_a_value_rejected_by_a_constructor_exits_2_naming_the_key(case, corpus, tmp_path):
    option, needles = REJECTED_AFTER_PARSING[case]
    result = console("fit", *_options(corpus, option), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    line = error_line(result.stderr)
    for needle in needles:
        assert needle in line, line
    # nothing reserved by the failed run is left behind
    assert not list((tmp_path / "runs" / "tiny").glob("version_*"))


# --------------------------------------------------------------------------------------------
# One version directory per run, reserved before anything is written
# --------------------------------------------------------------------------------------------

# The console script's entry point, started only once the barrier file exists: both runs then
# reach the choice of their version directory at the same moment.
_AT_BARRIER = """
import sys, time
from pathlib import Path
barrier = Path(sys.argv[1])
while not barrier.exists():
    time.sleep(0.005)
from slope_lightning.cli import main
sys.argv = ["slope-lightning", *sys.argv[2:]]
sys.exit(main())
"""


@pytest.mark.slow
def test_fits_started_at_the_same_moment_each_get_their_own_version(corpus, tmp_path):
    barrier = tmp_path / "go"
    args = ["fit", *_options(corpus, "--trainer.max_steps=1")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _AT_BARRIER, str(barrier), *args, f"--seed_everything={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    time.sleep(8)  # both have imported everything and wait at the barrier
    barrier.touch()
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr[-3000:]
    versions = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert versions == ["version_0", "version_1"]
    seeds = set()
    for version in versions:
        run_dir = tmp_path / "runs" / "tiny" / version
        config = (run_dir / "config.yaml").read_text()
        seeds.add(next(line for line in config.splitlines() if "seed_everything" in line))
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if "last" in p.name] == [
            "last.ckpt"
        ]
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert len(seeds) == 2  # each run's config.yaml is its own


@pytest.mark.slow
def test_a_runs_saved_config_reused_never_writes_into_that_run(corpus, tmp_path):
    """A run's config.yaml pins its version; fit, validate or test started from it (as users
    re-run or evaluate a run) each get a new version directory, and the run's own config,
    checkpoint and TensorBoard events stay as they were; --ckpt_path last still resumes it."""
    fit = console("fit", *_options(corpus), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "tiny" / "version_0"
    saved = run / "config.yaml"
    assert "version: 0" in saved.read_text()
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    checkpoint = str(run / "checkpoints" / "last.ckpt")

    validate = console(
        "validate", "--config", str(saved), f"--ckpt_path={checkpoint}", cwd=tmp_path
    )
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "names the run in" in validate.stderr
    again = console("fit", "--config", str(saved), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    versions = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert versions == ["version_0", "version_1", "version_2"]
    assert (tmp_path / "runs" / "tiny" / "version_2" / "checkpoints" / "last.ckpt").is_file()

    # --ckpt_path last resumes the latest run (version_2), in its own directory, though the
    # config pins version 0.
    resume = console(
        "fit", "--config", str(saved), "--ckpt_path=last", "--trainer.max_steps=4", cwd=tmp_path
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    latest = tmp_path / "runs" / "tiny" / "version_2"
    assert len(list(latest.glob("events.out.tfevents.*"))) == 2  # the first attempt, the resume


@pytest.mark.slow
def test_a_meta_init_run_that_fails_before_its_model_exists_ends_in_one_error_line(
    corpus, tmp_path
):
    """With model.meta_init the model is materialised in configure_model: a failure before it
    (a refusal at setup, a missing data source) still ends in the one line that names the
    fix, not in the teardown's "Cannot copy out of meta tensor"."""
    refused = console(
        "fit",
        *_options(corpus, "--model.meta_init=true"),
        '--trainer.callbacks=[{"class_path": "slope_lightning.callbacks.InitFromPretrained", '
        '"init_args": {"source": "dense.safetensors", "mask_method": "wanda"}}]',
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "meta tensor" not in refused.stderr  # refused up front
    assert "mask_method='magnitude' with model.meta_init: true" in error_line(refused.stderr)
    assert not (tmp_path / "runs").exists()  # before a run folder, data or model exists
    missing = console(
        "fit",
        *_options(corpus, "--model.meta_init=true"),
        "--data.sources=[absent.txt]",
        cwd=tmp_path,
    )
    assert missing.returncode != 0 and "meta tensor" not in missing.stderr
    assert "absent.txt" in error_line(missing.stderr)


# --------------------------------------------------------------------------------------------
# The held-out test split; checkpoints do not silently override explicit settings
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_test_evaluates_the_held_out_split_of_the_run_it_was_trained_with(corpus, tmp_path):
    options = _options(corpus, "--data.test_fraction=0.25")
    fit = console("fit", *options, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert LIGHTNING_ARGS_WARNING not in fit.stderr

    test = console("test", *options, "--ckpt_path=last", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/loss" in test.stdout and "test/ppl" in test.stdout

    other_split = console(
        "test", *_options(corpus, "--data.test_fraction=0.2"), "--ckpt_path=last", cwd=tmp_path
    )
    assert other_split.returncode == 2
    line = error_line(other_split.stderr)
    assert "data.test_fraction=0.2" in line and "0.25" in line

    no_split = console("test", *_options(corpus), "--ckpt_path=last", cwd=tmp_path)
    assert no_split.returncode == 2
    assert "no test split" in error_line(no_split.stderr)

    overridden = console(
        "validate", *options, "--ckpt_path=last", "--model.sparsity.n=1", cwd=tmp_path
    )
    assert overridden.returncode == 2
    line = error_line(overridden.stderr)
    assert "model.sparsity.n=1" in line and "checkpoint has 2" in line


# --------------------------------------------------------------------------------------------
# Advice that applies to the command that failed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "advice", "wrong"),
    [
        ("fit", "resume with --ckpt_path last", None),
        ("study", "run the same study command again", "--ckpt_path"),
        ("generate", "run the command again", "--ckpt_path"),
    ],
)
def test_an_interrupt_gives_advice_for_its_own_command(command, advice, wrong, monkeypatch, capsys):
    from slope_lightning import cli

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_subcommand", interrupted)
    assert cli.main([command]) == 130
    line = error_line(capsys.readouterr().err)
    assert advice in line
    if wrong is not None:
        assert wrong not in line
