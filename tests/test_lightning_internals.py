"""The Lightning internals the callbacks rely on (``callbacks/lightning_internals.py``) exist on
the installed Lightning, checked on a real trainer mid-fit; a Lightning upgrade that moves one
fails here with a message naming it, not late in a run."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slope_lightning.callbacks import lightning_internals
from slope_lightning.callbacks.lightning_internals import (
    batch_progress,
    missing_internals,
    processed_batches,
    validation_due,
)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val/loss", self.net(x).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Probe(Callback):
    """Reads every internal at the end of each training batch."""

    def __init__(self) -> None:
        self.missing: list[str] | None = None
        self.seen: list[tuple[int, int, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.missing = missing_internals(trainer)
        live = batch_progress(trainer)
        self.seen.append((processed_batches(trainer), int(live.completed), validation_due(trainer)))


def fit(probe: Probe) -> pl.Trainer:
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(Tiny(), data, data)
    return trainer


def test_every_lightning_internal_the_callbacks_use_is_there():
    probe = Probe()
    fit(probe)
    assert probe.missing == [], (
        f"Lightning {pl.__version__} changed what slope_lightning/callbacks/"
        f"lightning_internals.py relies on: {probe.missing}"
    )


def test_the_internals_read_the_loop_as_lightning_runs_it():
    probe = Probe()
    fit(probe)
    # At on_train_batch_end a batch is processed, not yet completed; validation follows
    # every second batch (val_check_interval=2).
    assert probe.seen == [(1, 0, False), (2, 1, True), (3, 2, False), (4, 3, True)]


def test_a_missing_internal_is_named(monkeypatch):
    probe = Probe()
    trainer = fit(probe)
    epoch_loop = type(trainer.fit_loop.epoch_loop)
    monkeypatch.delattr(epoch_loop, "_should_check_val_fx")
    assert missing_internals(trainer) == [
        "trainer.fit_loop.epoch_loop._should_check_val_fx(data_fetcher) changed"
    ]


def test_every_private_reach_is_a_named_function_of_one_module():
    for name in (
        "send_step_metrics",
        "validation_due",
        "mark_validation_pending",
        "rebuild_optimizers",
        "reload_checkpoint",
    ):
        function = getattr(lightning_internals, name)
        assert "Why" in (function.__doc__ or ""), f"{name} must say why it reaches inside"


def test_mark_validation_pending_rewrites_the_loop_state_as_a_restarted_validation():
    probe = Probe()
    trainer = fit(probe)
    state = trainer.fit_loop.state_dict()
    lightning_internals.mark_validation_pending(state)
    val = state["epoch_loop.val_loop.batch_progress"]
    assert val["total"]["started"] == val["total"]["completed"] + 1
    assert val["current"]["started"] == 0 and val["is_last_batch"] is False
