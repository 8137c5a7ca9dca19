"""MaskScheduler and LazyLoRA work with any LightningModule whose model was sparsified."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slope_lightning import sparsify
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.sparse import sparse_layers


class ForeignModule(pl.LightningModule):
    """Not ours: a regression MLP with its own optimizer and LambdaLR schedule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        sparsify(self.net)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

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


def test_callbacks_on_a_dense_module_say_to_sparsify():
    class Dense(ForeignModule):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.net = nn.Sequential(nn.Linear(16, 16))

    with pytest.raises(RuntimeError, match="sparsify"):
        trainer([MaskScheduler()], max_steps=1).fit(Dense(), loader())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MaskScheduler(every=0), "positive number"),
        (lambda: MaskScheduler(every=1.5), "positive number"),
        (lambda: LazyLoRA(start=1.5), r"\[0, 1\)"),
        (lambda: LazyLoRA(start=-2), ">= 0"),
        (lambda: LazyLoRA(rank=0), "positive int"),
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
