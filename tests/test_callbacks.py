"""MaskScheduler and LazyLoRA work with any LightningModule whose model was sparsified."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import LossRecorder, StopAt
from slope_lightning import sparsify
from slope_lightning.callbacks import LazyLoRA, MaskScheduler, SLoPe, hidden_size_of
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import SparseLinear, SparsityConfig, nm_mask, sparse_layers
from slope_lightning.sparse.calibration import collect_input_norms, wanda_sparsify
from slope_lightning.sparse.selection import plan_layers, swap_layers


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


def epochs_trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_lazy_lora_fraction_of_a_max_epochs_run_follows_its_estimated_steps():
    """2 epochs of 12 batches are 24 optimizer steps; 0.75 of them starts at step 18."""
    spy = AdapterSpy()
    t = epochs_trainer([LazyLoRA(start=0.75, rank=2), spy], max_epochs=2)
    t.fit(ForeignModule(), loader())
    assert t.global_step == 24
    assert [step for step, on in spy.has_adapter_at.items() if on] == list(range(18, 24))


def test_lazy_lora_fraction_follows_whichever_limit_ends_the_run_first():
    spy = AdapterSpy()
    # 1 epoch of 12 batches with accumulation 2 ends after 6 steps, before max_steps=100.
    t = epochs_trainer(
        [LazyLoRA(start=0.5, rank=2), spy], max_epochs=1, max_steps=100, accumulate_grad_batches=2
    )
    t.fit(ForeignModule(), loader())
    assert t.global_step == 6
    assert sorted({step for step, on in spy.has_adapter_at.items() if on}) == [3, 4, 5]


def test_lazy_lora_fraction_of_an_endless_run_is_a_clear_error():
    counter = StepCounter()
    t = epochs_trainer([LazyLoRA(start=0.5), counter], max_epochs=-1)
    with pytest.raises(ValueError, match=r"no known length .*set trainer.max_steps"):
        t.fit(ForeignModule(), loader())
    assert counter.steps == 0


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
        (
            LazyLoRA(start=8, rank=2),
            8,
            "switches adapters on at step 8, but the run ends after 8 optimizer steps",
        ),
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
        match=r"LazyLoRA\(start=0.9\) cannot add the adapters to this run's optimizer: "
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


# ------------------------------------------------------------------ adapter rank and lr


class OwnTransformerModule(pl.LightningModule):
    """Not ours either: the project's Transformer (d=128 LLaMA) inside a foreign module that
    has no ``config`` of its own; the hidden size is on ``self.model.config.d_model``."""

    def __init__(self, sparse: bool = True, d_model: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = TransformerConfig(
            vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, d_model=d_model
        )
        self.model = Transformer(config)
        if sparse:
            sparsify(self.model)

    def forward(self, x):
        return self.model(x)[0]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.model(x, y)[1]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_loader(batches: int = 8, batch_size: int = 2, vocab: int = 64, time: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batches * batch_size, time + 1), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch_size)


class Cfg:
    def __init__(self, **fields: int) -> None:
        self.__dict__.update(fields)


class HFShaped(ForeignModule):
    """A foreign module holding a model with a Hugging Face-style ``config.hidden_size``."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.net.config = Cfg(hidden_size=256)  # type: ignore[assignment]
        sparsify(self.net)


class ThreeLayers(ForeignModule):
    """No config anywhere: d_in 16 (twice) and 32 (once)."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16)
        )
        sparsify(self.net)


@pytest.mark.parametrize(
    ("make", "expected", "source"),
    [
        (OwnTransformerModule, 2, "model.config.d_model"),  # 1.56% of 128, every layer
        (HFShaped, 4, "net.config.hidden_size"),  # 1.56% of 256
        (ThreeLayers, 1, "the most common d_in (2 of 3 sparse layers)"),  # 1.56% of 16 -> 1
    ],
    ids=["own-transformer", "hf-config", "most-common-d_in"],
)
def test_a_fractional_rank_is_one_rank_for_every_layer_from_the_hidden_size(
    make, expected, source, caplog
):
    module = make()
    lazy = LazyLoRA(start=1, rank=0.0156)
    data = token_loader() if isinstance(module, OwnTransformerModule) else loader()
    with caplog.at_level("INFO", logger="slope_lightning.callbacks"):
        trainer([lazy], max_steps=2).fit(module, data)
    ranks = {layer.adapter.rank for _, layer in sparse_layers(module)}
    assert ranks == {expected}
    assert f"LazyLoRA: rank {expected} = 0.0156 x hidden size" in caplog.text
    assert source in caplog.text


def test_hidden_size_of_reads_every_known_config_attribute():
    for attribute in ("hidden_size", "n_embd", "d_model"):
        holder = nn.Module()
        holder.inner = nn.Linear(4, 4)
        holder.inner.config = Cfg(**{attribute: 96})  # type: ignore[assignment]
        assert hidden_size_of(holder) == (96, f"inner.config.{attribute}")


class ConstantFactorModule(ForeignModule):
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_an_explicit_adapter_lr_is_a_base_lr_scaled_by_the_schedule_and_says_so(caplog):
    t = trainer([LazyLoRA(start=2, rank=2, lr=4e-3)], max_steps=4)
    with caplog.at_level("INFO", logger="slope_lightning.callbacks"):
        t.fit(ConstantFactorModule(), loader())
    group = t.optimizers[0].param_groups[1]
    assert group["initial_lr"] == 4e-3 and group["lr"] == pytest.approx(2e-3)  # documented rule
    assert (
        "param group 'adapters' at step 2: base lr 0.004 (LazyLoRA(lr)) x the schedule's factor "
        "0.5 now = lr 0.002" in caplog.text
    )
    assert "base (peak) learning rate" in LazyLoRA.__doc__


# ------------------------------------------------------------------ sparsified in configure_model


class BuiltInConfigureModel(ForeignModule):
    """Builds (and, with ``sparsify_itself``, sparsifies) its network in configure_model, as
    large and sharded models do; idempotent, as Lightning asks."""

    def __init__(self, sparsify_itself: bool = True) -> None:
        pl.LightningModule.__init__(self)
        self.sparsify_itself = sparsify_itself
        self.net: nn.Module | None = None
        self.optimizers_built = 0

    def configure_model(self) -> None:
        if self.net is not None:
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        if self.sparsify_itself:
            sparsify(self.net)

    def configure_optimizers(self):
        self.optimizers_built += 1
        return super().configure_optimizers()


def test_callbacks_find_layers_sparsified_in_configure_model():
    module, spy, mask = BuiltInConfigureModel(), AdapterSpy(), MaskScheduler(every=2)
    t = trainer([mask, LazyLoRA(start=4, rank=2), spy], max_steps=6)
    t.fit(module, loader())
    assert not mask.idle and mask.refreshes == 2
    assert [step for step, on in spy.has_adapter_at.items() if on] == [4, 5]
    values = {id(layer.values) for _, layer in sparse_layers(module)}
    assert values <= {id(p) for p in t.optimizers[0].param_groups[0]["params"]}


def run_module(make, root: Path, stop_at: int | None = None, ckpt: Path | None = None, extra=()):
    pl.seed_everything(3)
    module, recorder = make(), LossRecorder()
    callbacks = [*extra, MaskScheduler(every=1), LazyLoRA(start=3, rank=4), recorder]
    t = trainer(callbacks + ([StopAt(stop_at)] if stop_at else []), max_steps=6)
    t.fit(module, same_batches(), ckpt_path=ckpt)
    if stop_at:
        t.save_checkpoint(root / "interrupted.ckpt")
    return module, recorder.losses


def assert_resumes_exactly(make, root: Path, extra=lambda: ()):
    full_module, full = run_module(make, root, extra=extra())
    _, first = run_module(make, root, stop_at=4, extra=extra())
    resumed, rest = run_module(make, root, ckpt=root / "interrupted.ckpt", extra=extra())
    assert sorted(rest) == [4, 5]
    assert {**first, **rest} == full  # bit-exact losses, step by step
    for (name, a), (_, b) in zip(
        full_module.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_a_module_sparsified_in_configure_model_resumes_exactly_across_the_adapter_start(tmp_path):
    assert_resumes_exactly(BuiltInConfigureModel, tmp_path)


# ------------------------------------------------------------------ the SLoPe callback


class Plain(ForeignModule):
    """A module that knows nothing of SLoPe: plain nn.Linear layers."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.optimizers_built = 0

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        self.optimizers_built += 1
        return super().configure_optimizers()


def optimized_ids(t: pl.Trainer) -> set[int]:
    return {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}


@pytest.mark.parametrize("slope_first", [True, False], ids=["slope-first", "slope-last"])
def test_slope_converts_an_unchanged_module_before_its_optimizer_is_built(slope_first):
    module, spy, mask = Plain(), AdapterSpy(), MaskScheduler(every=2)
    others = [mask, LazyLoRA(start=4, rank=2), spy]
    slope = SLoPe()
    t = trainer([slope, *others] if slope_first else [*others, slope], max_steps=6)
    t.fit(module, loader())
    layers = sparse_layers(module)
    assert [name for name, _ in layers] == ["net.0", "net.2"]
    assert {id(layer.values) for _, layer in layers} <= optimized_ids(t)
    assert module.optimizers_built == 1  # converted in setup: nothing to rebuild
    assert mask.refreshes == 2 and not mask.idle
    assert [step for step, on in spy.has_adapter_at.items() if on] == [4, 5]
    assert slope.report is not None and len(slope.report.converted) == 2


def test_slope_converts_a_model_built_in_configure_model_and_rebuilds_the_optimizer():
    module = BuiltInConfigureModel(sparsify_itself=False)
    spy = AdapterSpy()
    t = trainer([MaskScheduler(every=2), LazyLoRA(start=4, rank=2), spy, SLoPe()], max_steps=6)
    t.fit(module, loader())
    assert module.optimizers_built == 2  # once over the dense weights, once over the sparse
    layers = sparse_layers(module)
    assert len(layers) == 2
    assert {id(layer.values) for _, layer in layers} <= optimized_ids(t)
    assert not any(isinstance(m, nn.Linear) for m in module.net.modules())
    assert [step for step, on in spy.has_adapter_at.items() if on] == [4, 5]
    assert t.lr_scheduler_configs[0].scheduler.optimizer is t.optimizers[0]


@pytest.mark.parametrize(
    "make", [Plain, lambda: BuiltInConfigureModel(sparsify_itself=False)], ids=["init", "configure"]
)
def test_a_run_with_the_slope_callback_resumes_exactly_across_the_adapter_start(make, tmp_path):
    assert_resumes_exactly(make, tmp_path, extra=lambda: [SLoPe()])


def test_slope_on_the_projects_own_model_in_a_foreign_module(tmp_path):
    module = OwnTransformerModule(sparse=False)
    lazy = LazyLoRA(start=3, rank=0.0156)
    t = trainer(
        [
            SLoPe(mask_method="wanda", calibration_batches=2, calibration_data=token_loader()),
            MaskScheduler(),
            lazy,
        ],
        5,
    )
    t.fit(module, token_loader())
    layers = sparse_layers(module)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in both blocks
    assert {layer.adapter.rank for _, layer in layers} == {2}  # 1.56% of d_model=128
    assert isinstance(module.model.lm_head, nn.Linear)  # the head stays dense
    with torch.no_grad():
        out = module.model.eval().generate(torch.zeros(1, 3, dtype=torch.long), 4, 0.0)
    assert out.shape == (1, 7)


def test_slope_wanda_uses_the_calibration_batches_like_calibrate_and_sparsify():
    batches = [torch.randn(8, 16) * torch.linspace(0.1, 4.0, 16) for _ in range(2)]
    reference = Plain()
    names = ["net.0", "net.2"]
    norms = collect_input_norms(reference, [(b, None) for b in batches], layers=names)
    wanda_sparsify(reference, norms)
    module = Plain()
    slope = SLoPe(mask_method="wanda", calibration_data=[(b, None) for b in batches])
    trainer([slope], max_steps=1).fit(module, loader())
    for (name, ours), (_, theirs) in zip(
        sparse_layers(module), sparse_layers(reference), strict=True
    ):
        assert torch.equal(ours.row_index, theirs.row_index), name
    assert [d.reason for d in slope.report.converted] == ["converted (wanda)"] * 2


def spy_everywhere(monkeypatch: pytest.MonkeyPatch, function: Callable[..., Any]) -> list[str]:
    """Record each call of ``function`` (the model's class name) through every module of the
    package that imported it; monkeypatch puts the originals back after the test."""
    calls: list[str] = []

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(model).__name__)
        return function(model, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if (
            name.startswith("slope_lightning")
            and getattr(module, function.__name__, None) is function
        ):
            monkeypatch.setattr(module, function.__name__, spy)
    return calls


@pytest.mark.parametrize(
    "make, mask_method",
    [
        (Plain, "magnitude"),
        (Plain, "wanda"),
        (lambda: BuiltInConfigureModel(sparsify_itself=False), "magnitude"),
    ],
    ids=["init", "init-wanda", "configure-model"],
)
def test_slope_plans_the_layers_once_and_swaps_them_once(make, mask_method, monkeypatch):
    plans = spy_everywhere(monkeypatch, plan_layers)
    swaps = spy_everywhere(monkeypatch, swap_layers)
    module = make()
    batches = [(torch.randn(8, 16), None)]
    slope = SLoPe(mask_method=mask_method, calibration_data=batches)
    # MaskScheduler and LazyLoRA ask SLoPe to convert first: it still converts once.
    trainer([MaskScheduler(), LazyLoRA(start=1, rank=2), slope], max_steps=2).fit(module, loader())
    assert plans == [type(module).__name__] and swaps == [type(module).__name__]
    assert slope.report is not None and [d.name for d in slope.report.converted] == [
        "net.0",
        "net.2",
    ]


class WithDataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()


def test_slope_wanda_calibrates_on_the_datamodule_and_needs_some_data():
    module = Plain()
    trainer([SLoPe(mask_method="wanda", calibration_batches=3)], max_steps=2).fit(
        module, datamodule=WithDataModule()
    )
    assert len(sparse_layers(module)) == 2
    with pytest.raises(ValueError, match="needs calibration batches"):
        trainer([SLoPe(mask_method="wanda")], max_steps=2).fit(Plain(), loader())
    with pytest.raises(ValueError, match="defines no forward"):
        trainer([SLoPe(mask_method="wanda")], max_steps=2).fit(
            BuiltInConfigureModel(sparsify_itself=False), datamodule=WithDataModule()
        )


def test_slope_prunes_a_dense_module_for_evaluation():
    module = Plain()
    dense = module.net[0].weight.detach().clone()
    evaluator = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[SLoPe()]
    )
    evaluator.validate(module, loader())
    layer = module.net[0]
    assert isinstance(layer, SparseLinear)
    assert torch.equal(layer.to_dense(), dense * nm_mask(dense, 2, 4))  # one-shot magnitude


def test_slope_validates_a_checkpoint_of_a_module_built_in_configure_model(tmp_path):
    trained, _ = run_module(
        lambda: BuiltInConfigureModel(sparsify_itself=False), tmp_path, 5, extra=[SLoPe()]
    )
    fresh = BuiltInConfigureModel(sparsify_itself=False)
    evaluator = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[SLoPe()]
    )
    evaluator.validate(fresh, same_batches(), ckpt_path=tmp_path / "interrupted.ckpt")
    for (name, a), (_, b) in zip(sparse_layers(trained), sparse_layers(fresh), strict=True):
        assert torch.equal(a.values, b.values) and torch.equal(a.row_index, b.row_index), name
        assert torch.equal(a.adapter.up, b.adapter.up), name


def test_slope_with_nothing_to_convert_says_why():
    class Odd(Plain):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 16))

    with pytest.raises(ValueError, match=r"SLoPe: no layer of Odd could be made 2:4 sparse.*m=4"):
        trainer([SLoPe()], max_steps=1).fit(Odd(), loader())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: SLoPe(mask_method="sparsegpt"), ValueError, "choose one of"),
        (lambda: SLoPe(n=4, m=4), ValueError, "SLoPe: sparsity.n / sparsity.m"),
        (lambda: SLoPe(backend="nope"), ValueError, "SLoPe: sparsity.backend"),
        (lambda: SLoPe(calibration_batches=0), ValueError, "positive number"),
        (lambda: SLoPe(exclude="lm_head"), ValueError, "list of fnmatch patterns"),
        (lambda: SLoPe(m=8, config=SparsityConfig()), TypeError, "m were given too"),
        (lambda: SLoPe(config=SparsityConfig(sparse=False)), ValueError, "sparse=False"),
    ],
)
def test_bad_slope_arguments_are_rejected(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_slope_takes_its_settings_from_a_sparsity_config():
    module = Plain()
    config = SparsityConfig(n=1, m=4, include=["net.0"])
    trainer([SLoPe(config=config)], max_steps=1).fit(module, loader())
    assert [(name, layer.n, layer.m) for name, layer in sparse_layers(module)] == [("net.0", 1, 4)]


# ------------------------------------------------------------------ a Hugging Face model


def tiny_llama():
    hf = pytest.importorskip("transformers", reason="transformers is in the test extras")
    config = hf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return hf.LlamaForCausalLM(config)


class HFModule(pl.LightningModule):
    """A foreign module around a Hugging Face LlamaForCausalLM, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.model(input_ids=x, labels=x).loss

    def forward(self, x):
        return self.model(input_ids=x).logits

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def hf_batches(batches: int = 6) -> DataLoader:
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x.repeat(batches, 1), x.repeat(batches, 1)), batch_size=2)


@pytest.mark.slow
def test_slope_makes_a_hugging_face_llama_sparse_and_resumes_exactly(tmp_path):
    def run(stop_at=None, ckpt=None):
        pl.seed_everything(3)
        module, recorder = HFModule(), LossRecorder()
        callbacks = [
            SLoPe(mask_method="wanda", calibration_batches=2, calibration_data=hf_batches()),
            MaskScheduler(every=1),
            LazyLoRA(start=3, rank=0.0625),
            recorder,
        ]
        t = trainer(callbacks + ([StopAt(stop_at)] if stop_at else []), max_steps=6)
        t.fit(module, hf_batches(), ckpt_path=ckpt)
        if stop_at:
            t.save_checkpoint(tmp_path / "hf.ckpt")
        return module, recorder.losses

    full_module, full = run()
    layers = sparse_layers(full_module)
    assert len(layers) == 2 * 7 and {layer.adapter.rank for _, layer in layers} == {4}  # 6.25% x 64
    assert isinstance(full_module.model.lm_head, nn.Linear)
    _, first = run(stop_at=4)
    resumed, rest = run(ckpt=tmp_path / "hf.ckpt")
    assert {**first, **rest} == full
    for (name, a), (_, b) in zip(sparse_layers(full_module), sparse_layers(resumed), strict=True):
        assert torch.equal(a.values, b.values), name


# ------------------------------------------------------------------ GPT-2: transformers' Conv1D


def tiny_gpt2(seed: int = 0) -> nn.Module:
    hf = pytest.importorskip("transformers", reason="transformers is in the test extras")
    config = hf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(seed)
    return hf.GPT2LMHeadModel(config)


#: GPT-2's block layers: all of them transformers Conv1D (the LM head is an nn.Linear).
GPT2_BLOCK_LAYERS = [
    f"transformer.h.{i}.{layer}"
    for i in range(2)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


class GPT2Module(HFModule):
    """A foreign module around a Hugging Face GPT2LMHeadModel, unchanged."""

    def __init__(self, sparse: bool = False) -> None:
        pl.LightningModule.__init__(self)
        self.model = tiny_gpt2()
        if sparse:
            sparsify(self.model)


class TokenData(pl.LightningDataModule):
    def train_dataloader(self):
        return hf_batches()


class Snapshot(pl.Callback):
    """The model's state when training starts (after every setup-time conversion)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {
            key: value.detach().clone()
            for key, value in pl_module.model.state_dict().items()
            if isinstance(value, torch.Tensor)
        }


def test_slope_calibrates_wanda_masks_for_gpt2_conv1d_layers():
    reference = GPT2Module()
    norms = collect_input_norms(reference, list(hf_batches())[:2])
    wanda_sparsify(reference, norms)
    module = GPT2Module()
    slope = SLoPe(mask_method="wanda", calibration_batches=2, calibration_data=hf_batches())
    trainer([slope, MaskScheduler()], max_steps=2).fit(module, hf_batches())

    names = [f"model.{name}" for name in GPT2_BLOCK_LAYERS]
    assert slope.report is not None
    assert [d.name for d in slope.report.converted] == names
    assert {d.reason for d in slope.report.converted} == {"converted (wanda, Conv1D)"}
    ours, theirs = dict(sparse_layers(module)), dict(sparse_layers(reference))
    for name in names:
        assert ours[name].weight_layout == "conv1d"
        assert torch.equal(ours[name].row_index, theirs[name].row_index), name  # Wanda's M_R
    assert isinstance(module.model.lm_head, nn.Linear)


def test_init_from_pretrained_prunes_gpt2_conv1d_weights_in_their_own_layout(tmp_path):
    from safetensors.torch import save_file

    from slope_lightning.callbacks import InitFromPretrained

    pretrained = tiny_gpt2(seed=1)
    state = {k: v.contiguous() for k, v in pretrained.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "gpt2.safetensors"))  # Conv1D weights stored (d_in, d_out)
    snapshot = Snapshot()
    init = InitFromPretrained(
        source=str(tmp_path / "gpt2.safetensors"), mask_method="wanda", calibration_batches=2
    )
    trainer([init, snapshot], max_steps=1).fit(GPT2Module(sparse=True), datamodule=TokenData())

    reference = tiny_gpt2(seed=1)  # the pretrained weights, pruned by Wanda directly
    norms = collect_input_norms(reference, list(hf_batches())[:2], layers=GPT2_BLOCK_LAYERS)
    report = wanda_sparsify(reference, norms, include=GPT2_BLOCK_LAYERS, exclude=())
    assert len(report.converted) == 8
    for key, value in reference.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(snapshot.state[key], value), key  # masks, kept values, the rest


# ------------------------------------------------------------------ litgpt


class LitGPTModule(pl.LightningModule):
    """A foreign module around a litgpt ``GPT`` (a LLaMA-shaped one), unchanged."""

    def __init__(self) -> None:
        super().__init__()
        litgpt = pytest.importorskip(
            "litgpt", reason="litgpt is optional (not a dependency): pip install litgpt"
        )
        config = litgpt.Config(
            n_layer=2,
            n_head=4,
            n_query_groups=2,
            n_embd=64,
            block_size=32,
            vocab_size=128,
            padded_vocab_size=128,
            bias=False,
            intermediate_size=128,
            mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm",
            rotary_percentage=1.0,
            parallel_residual=False,
        )
        torch.manual_seed(0)
        self.model = litgpt.GPT(config)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        logits = self.model(x[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_slope_makes_a_litgpt_gpt_sparse_and_it_trains():
    module = LitGPTModule()
    block_linears = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and name.startswith("model.transformer.h.")
    ]
    assert len(block_linears) == 2 * 5  # qkv, proj, fc_1, fc_2, mlp proj per block
    recorder = LossRecorder()
    trainer([SLoPe(), MaskScheduler(), recorder], max_steps=4).fit(module, hf_batches())
    assert [name for name, _ in sparse_layers(module)] == block_linears
    assert isinstance(module.model.lm_head, nn.Linear)  # the head stays dense
    losses = [recorder.losses[step] for step in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
