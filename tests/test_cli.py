"""The `slope-lightning` command: every shipped config parses, and `fit` runs in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_helpers import write_corpus
from slope_lightning.bench.runs import summarise
from slope_lightning.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0


def test_configs_are_documented_yaml():
    for config in CONFIGS:
        text = config.read_text()
        assert text.startswith("#"), f"{config.name} should open with a comment saying what it is"
        yaml.safe_load(text)


@pytest.mark.slow
def test_fit_runs_end_to_end_and_resumes_from_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = write_corpus(tmp_path / "docs")
    args = [
        "fit",
        "--config",
        str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
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
    cli = main(args)
    trainer = cli.trainer
    assert trainer.global_step == 6
    assert float(trainer.callback_metrics["val/ppl"]) > 1.0
    run_dir = Path(trainer.log_dir)
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt").is_file()
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
    # Resume from `last` and train further.
    resumed = main([*args, "--trainer.max_steps=8", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 8
    assert resumed.trainer.ckpt_path.endswith("last.ckpt")


def _tensorboard_tags(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_a_bad_config_value_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.sparsity.backend=fastest"])
    assert "backend" in capsys.readouterr().err
