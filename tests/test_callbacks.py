"""MaskScheduler and LazyLoRA work with any LightningModule whose model was sparsified."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import LossRecorder, StopAt
from slope_lightning import sparsify
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.sparse import sparse_layers


class ForeignModule(pl.LightningModule):
    """Not ours: a regression MLP with its own optimizer and LambdaLR schedule. It knows
    nothing of adapters (no restore_adapters, no on_load_checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        sparsify(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def loader(batches: int = 12, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 16, generator=g)
    return DataLoader(TensorDataset(x, x.flip(-1)), batch_size=batch_size)


def trainer(callbacks, max_steps: int = 8, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class RefreshSpy(pl.Callback):
    """Records the steps at which any layer's col_index object changed."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.changed_at: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = dict(sparse_layers(pl_module))
        if self.seen and any(layers[k].col_index is not v for k, v in self.seen.items()):
            self.changed_at.append(trainer.global_step - 1)  # the step whose forward refreshed
        self.seen = {k: layer.col_index for k, layer in layers.items()}


def test_mask_scheduler_owns_the_schedule_and_refreshes_every_k_steps():
    module = ForeignModule()
    spy = RefreshSpy()
    scheduler = MaskScheduler(every=3)
    trainer([scheduler, spy], max_steps=10).fit(module, loader())
    assert all(layer.transpose_mask_interval is None for _, layer in sparse_layers(module))
    assert spy.changed_at == [3, 6, 9]
    assert scheduler.refreshes == 3 and scheduler.last_refresh_step == 9


def test_mask_scheduler_accepts_a_callable_schedule():
    spy = RefreshSpy()
    trainer([MaskScheduler(every=lambda step: step in (2, 5)), spy], max_steps=8).fit(
        ForeignModule(), loader()
    )
    assert spy.changed_at == [2, 5]


def test_mask_scheduler_logs_sparsity_statistics():
    module = ForeignModule()
    t = trainer([MaskScheduler(every=1)], max_steps=4, log_every_n_steps=1)
    t.fit(module, loader())
    metrics = t.callback_metrics
    kept = float(metrics["sparsity/wrc_kept_fraction"])
    assert 0.6 < kept < 1.0
    assert float(metrics["sparsity/backward_dropped_fraction"]) == pytest.approx(1 - kept)
    assert "sparsity/mc_flipped" in metrics


class AdapterSpy(pl.Callback):
    def __init__(self) -> None:
        self.has_adapter_at: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.has_adapter_at[trainer.global_step] = pl_module.net[0].adapter is not None


def test_lazy_lora_switches_adapters_on_at_the_start_step_and_trains_them():
    module = ForeignModule()
    spy = AdapterSpy()
    lazy = LazyLoRA(start=5, rank=4, lr=5e-3)
    t = trainer([lazy, spy], max_steps=8, log_every_n_steps=1)
    t.fit(module, loader())
    assert [step for step, on in spy.has_adapter_at.items() if on] == [5, 6, 7]
    optimizer = t.optimizers[0]
    assert len(optimizer.param_groups) == 2
    adapter_group = optimizer.param_groups[1]
    assert len(adapter_group["params"]) == 4 and adapter_group["initial_lr"] == 5e-3
    assert adapter_group["name"] == "adapters"
    # The new group follows the module's own LambdaLR: lr = 5e-3 / (1 + step).
    assert adapter_group["lr"] == pytest.approx(5e-3 / (1 + 8))
    assert module.net[0].adapter.up.abs().sum() > 0  # R started at 0 and was trained
    assert lazy.active and lazy.started_at == 5
    assert "adapters/R_norm" in t.callback_metrics


def test_lazy_lora_fractional_start_follows_max_steps():
    spy = AdapterSpy()
    trainer([LazyLoRA(start=0.75, rank=2), spy], max_steps=8).fit(ForeignModule(), loader())
    assert [step for step, on in spy.has_adapter_at.items() if on] == [6, 7]


def test_lazy_lora_fraction_without_max_steps_is_a_clear_error():
    t = pl.Trainer(
        max_epochs=1,
        callbacks=[LazyLoRA(start=0.5)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        t.fit(ForeignModule(), loader())


class Dense(ForeignModule):
    def __init__(self):
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(16, 16))


def test_callbacks_on_a_dense_module_are_idle_and_say_how_to_sparsify():
    mask, lazy = MaskScheduler(), LazyLoRA(start=1, rank=2)
    t = trainer([mask, lazy], max_steps=3)
    with pytest.warns(UserWarning) as warned:
        t.fit(Dense(), loader())
    messages = [str(w.message) for w in warned]
    for who in ("MaskScheduler", "LazyLoRA"):
        idle = [m for m in messages if m.startswith(f"{who} is idle")]
        assert len(idle) == 1, messages  # said once
        assert "no SparseLinear layer" in idle[0] and "sparsify(model)" in idle[0]
    assert t.global_step == 3  # the dense run trained
    assert mask.idle and lazy.idle and not lazy.active and mask.refreshes == 0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MaskScheduler(every=0), "positive number"),
        (lambda: MaskScheduler(every=1.5), "positive number"),
        (lambda: LazyLoRA(start=1.5), r"\[0, 1\)"),
        (lambda: LazyLoRA(start=-2), ">= 0"),
        (lambda: LazyLoRA(rank=0), "positive int"),
        (lambda: LazyLoRA(rank=4.0), r"must lie in \(0, 1\); for an absolute rank give an int"),
        (lambda: LazyLoRA(rank=1.5), r"must lie in \(0, 1\)"),
        (lambda: LazyLoRA(start=2.0), r"must lie in \[0, 1\).*give an int"),
        (lambda: LazyLoRA(hidden_size=0), "positive width"),
        (lambda: LazyLoRA(weight_decay=-0.1), "must be >= 0"),
        (lambda: LazyLoRA(init="xavier"), "'slope' or 'peft'"),
        (lambda: LazyLoRA(lr=-1.0), "positive"),
    ],
)
def test_bad_callback_arguments_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_fractional_rank_refers_to_the_hidden_size():
    spy = AdapterSpy()
    lazy = LazyLoRA(start=2, rank=0.25, hidden_size=16)
    module = ForeignModule()
    trainer([lazy, spy], max_steps=3).fit(module, loader())
    assert [layer.adapter.rank for _, layer in sparse_layers(module)] == [4, 4]
    assert lazy.resolved_rank(module) == 4


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1


@pytest.mark.parametrize(
    ("lazy", "max_steps", "match"),
    [
        (LazyLoRA(start=8, rank=2), 8, "switches adapters on at step 8, but trainer.max_steps=8"),
        (
            LazyLoRA(start=2, rank=16),
            4,
            r"LazyLoRA\(rank=16\) on layer 'net.0'.*0 < rank < min\(d_in, d_out\) = 16",
        ),
        (
            LazyLoRA(start=2, rank=0.5, hidden_size=64),
            4,
            r"adapter rank 32 must satisfy 0 < rank < min\(d_in, d_out\) = 16",
        ),
    ],
    ids=["start-after-max_steps", "rank-too-large", "fraction-too-large"],
)
def test_lazy_lora_settings_that_would_fail_late_fail_before_the_first_step(lazy, max_steps, match):
    counter = StepCounter()
    with pytest.raises(ValueError, match=match):
        trainer([lazy, counter], max_steps=max_steps).fit(ForeignModule(), loader())
    assert counter.steps == 0


class PlateauModule(ForeignModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "x"}}


def test_a_scheduler_the_adapters_cannot_follow_fails_before_the_first_step():
    counter = StepCounter()
    with pytest.raises(
        ValueError,
        match=r"LazyLoRA\(start=0.9\) cannot add the adapters to this run's optimizer at step 7: "
        r"cannot add a param group that follows ReduceLROnPlateau: .*LambdaLR",
    ):
        trainer([LazyLoRA(start=0.9, rank=2), counter], max_steps=8).fit(PlateauModule(), loader())
    assert counter.steps == 0


class OneCycleModule(ForeignModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=8)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_lazy_lora_follows_one_cycle_lr_and_the_lr_monitor_names_the_group(tmp_path):
    t = trainer(
        [LazyLoRA(start=4, rank=2), LearningRateMonitor(logging_interval="step")],
        max_steps=8,
        log_every_n_steps=1,
    )
    t.loggers = [CSVLogger(tmp_path)]
    t.fit(OneCycleModule(), loader())
    adapters, base = t.optimizers[0].param_groups[1], t.optimizers[0].param_groups[0]
    assert adapters["lr"] == pytest.approx(base["lr"])  # lr=None: group 0's schedule
    assert "lr-AdamW/adapters" in t.callback_metrics
    assert "lr-AdamW/pg1" in t.callback_metrics  # the foreign module's own, unnamed group


def same_batches(batches: int = 12, batch_size: int = 8) -> DataLoader:
    """Every batch equal, so a run resumed mid-epoch (the loader restarts) sees the same data."""
    x = torch.randn(batch_size, 16, generator=torch.Generator().manual_seed(1))
    return DataLoader(
        TensorDataset(x.repeat(batches, 1), x.flip(-1).repeat(batches, 1)), batch_size
    )


def run_foreign(root: Path, stop_at: int | None = None, ckpt: Path | None = None):
    pl.seed_everything(3)
    module, recorder = ForeignModule(), LossRecorder()
    callbacks = [MaskScheduler(every=1), LazyLoRA(start=3, rank=4), recorder]
    t = trainer(callbacks + ([StopAt(stop_at)] if stop_at else []), max_steps=6)
    t.fit(module, same_batches(), ckpt_path=ckpt)
    if stop_at:
        t.save_checkpoint(root / "interrupted.ckpt")
    return module, recorder.losses


def test_a_foreign_module_resumes_exactly_across_the_adapter_start(tmp_path):
    full_module, full = run_foreign(tmp_path)
    _, first = run_foreign(tmp_path, stop_at=4)
    resumed_module, rest = run_foreign(tmp_path, ckpt=tmp_path / "interrupted.ckpt")
    assert sorted(rest) == [4, 5]
    assert {**first, **rest} == full  # bit-exact losses, step by step
    for (name, a), (_, b) in zip(
        full_module.state_dict().items(), resumed_module.state_dict().items(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("with_callback", [True, False])
def test_validate_restores_adapters_of_a_foreign_module(tmp_path, with_callback):
    trained, _ = run_foreign(tmp_path, stop_at=5)
    fresh = ForeignModule()
    callbacks = [LazyLoRA(start=3, rank=4)] if with_callback else []
    evaluator = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=callbacks
    )
    evaluator.validate(fresh, same_batches(), ckpt_path=tmp_path / "interrupted.ckpt")
    assert torch.equal(fresh.net[0].adapter.up, trained.net[0].adapter.up)


def test_load_from_checkpoint_after_the_adapter_start_needs_no_callback(tmp_path):
    trained, _ = run_foreign(tmp_path, stop_at=5)
    loaded = ForeignModule.load_from_checkpoint(tmp_path / "interrupted.ckpt", weights_only=True)
    assert torch.equal(loaded.net[0].adapter.up, trained.net[0].adapter.up)
