"""The callbacks' device-side checks and statistics on two processes (FSDP2, gloo on CPU):
configs/tiny-fsdp.yaml logging every step, so that NonFiniteGuard's reduced reading,
MaskScheduler's statistics of sharded layers and TokenThroughput's all-device rates all run,
through the real console entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_helpers import write_corpus
from test_fsdp import launch

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_tiny_fsdp_logs_every_step_through_the_device_side_callbacks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sources = write_corpus(tmp_path / "docs")
    command = [sys.executable, "-m", "slope_lightning.cli", "fit"]
    command += ["--config", str(ROOT / "configs" / "tiny-fsdp.yaml")]
    command += [
        f"--data.sources=[{sources}]",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.vocab_size=300",
        "--data.seq_len=32",
        "--data.batch_size=2",
        "--model.model_overrides={n_layer: 1, d_model: 64, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    launch(command, "slope-lightning fit --config configs/tiny-fsdp.yaml (log every step)")
    run_dir = tmp_path / "runs" / "tiny-fsdp" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "sparsity/wrc_kept_fraction",
        "sparsity/mc_flipped",
        "train/device/items_per_sec",
        "train/items_per_sec",  # all devices: two processes
    ):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    kept = [e.value for e in events.Scalars("sparsity/wrc_kept_fraction")]
    assert kept and all(0.5 < value < 1.0 for value in kept)
    device = events.Scalars("train/device/items_per_sec")[-1].value
    total = events.Scalars("train/items_per_sec")[-1].value
    assert total == pytest.approx(2 * device)
