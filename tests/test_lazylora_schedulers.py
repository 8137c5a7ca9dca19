"""LazyLoRA works with every scheduler in ``torch.optim.lr_scheduler``.

A foreign LightningModule declares the adapters' group, empty, where it builds its optimizer
(``adapter_param_group()``); every scheduler then follows that group from its construction,
and LazyLoRA only fills it at the start step. So, for every scheduler, with fused and
foreach AdamW: the adapters train after the start, every group's learning rate at every
step is the one the scheduler gives the same optimizer stepped alone (the adapters' equal to
the model's), and a run resumed from a checkpoint taken after the start ends bit for bit
where the uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched
from torch.utils.data import DataLoader, TensorDataset

from lightning_helpers import StopAt
from slope_lightning import sparsify
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.optim import adapter_param_group
from slope_lightning.sparse import sparse_layers

STEPS = 8  # optimizer steps of every run
START = 3  # LazyLoRA's start step
LR = 1e-2

#: One instance of every scheduler class in torch.optim.lr_scheduler, with settings whose
#: learning rate moves within STEPS steps.
SCHEDULERS: dict[str, Callable[[Optimizer], object]] = {
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "MultiplicativeLR": lambda opt: sched.MultiplicativeLR(opt, lambda step: 0.8),
    "StepLR": lambda opt: sched.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda opt: sched.ConstantLR(opt, factor=0.5, total_iters=4),
    "LinearLR": lambda opt: sched.LinearLR(opt, start_factor=0.25, total_iters=5),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.8),
    "SequentialLR": lambda opt: sched.SequentialLR(  # warmup, then cosine
        opt,
        [
            sched.LinearLR(opt, start_factor=0.1, total_iters=3),
            sched.CosineAnnealingLR(opt, T_max=STEPS - 3, eta_min=1e-4),
        ],
        milestones=[3],
    ),
    "PolynomialLR": lambda opt: sched.PolynomialLR(opt, total_iters=STEPS, power=2.0),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
    "ChainedScheduler": lambda opt: sched.ChainedScheduler(
        [sched.ConstantLR(opt, factor=0.5, total_iters=3), sched.ExponentialLR(opt, gamma=0.9)]
    ),
    "CyclicLR": lambda opt: sched.CyclicLR(opt, base_lr=1e-4, max_lr=LR, step_size_up=2),
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=LR, total_steps=STEPS),
    "CosineAnnealingWarmRestarts": lambda opt: sched.CosineAnnealingWarmRestarts(
        opt, T_0=3, eta_min=1e-4
    ),
    # The monitored metric never improves: the lr halves after every 2 steps without progress.
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=1),
}
PLATEAU_METRIC = 1.0

OPTIMIZERS = ["fused", "foreach"]


def build_optimizer(parameters, scheduler: str, kind: str) -> tuple[Optimizer, object]:
    """What the foreign module's configure_optimizers builds: AdamW over its parameters plus
    the adapters' empty group, and the scheduler."""
    optimizer = torch.optim.AdamW(
        [{"params": list(parameters)}, adapter_param_group()],
        lr=LR,
        fused=kind == "fused",
        foreach=kind == "foreach",
    )
    return optimizer, SCHEDULERS[scheduler](optimizer)


class Regressor(pl.LightningModule):
    """Not ours: a plain MLP, sparsified, with its own optimizer and scheduler."""

    def __init__(self, scheduler: str, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        sparsify(self.net)
        self.scheduler, self.kind = scheduler, kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("plateau", PLATEAU_METRIC)  # what ReduceLROnPlateau monitors
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.parameters(), self.scheduler, self.kind)
        config = {"scheduler": scheduler, "interval": "step", "monitor": "plateau"}
        return {"optimizer": optimizer, "lr_scheduler": config}


class LrRecorder(pl.Callback):
    """Every group's lr when each optimizer step starts, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.lrs[trainer.global_step] = [float(group["lr"]) for group in groups]


def same_batches() -> DataLoader:
    """Every batch equal, so a run resumed mid-epoch (the loader restarts) sees the same data."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x.repeat(STEPS, 1), x.flip(-1).repeat(STEPS, 1)), 8)


def fit(
    scheduler: str,
    kind: str,
    stop_at: int | None = None,
    ckpt: Path | None = None,
    save: Path | None = None,
) -> tuple[Regressor, LrRecorder, pl.Trainer]:
    pl.seed_everything(3)
    module, recorder = Regressor(scheduler, kind), LrRecorder()
    callbacks = [MaskScheduler(every=1), LazyLoRA(start=START, rank=4), recorder]
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=callbacks + ([StopAt(stop_at)] if stop_at else []),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, same_batches(), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, recorder, trainer


def scheduled_lrs(scheduler: str, kind: str) -> dict[int, list[float]]:
    """The reference: the same optimizer and scheduler stepped alone, with no adapters ever
    placed (the scheduler's own formula), every group's lr before each step."""
    optimizer, schedule = build_optimizer(Regressor(scheduler, kind).parameters(), scheduler, kind)
    lrs = {}
    for step in range(STEPS):
        lrs[step] = [float(group["lr"]) for group in optimizer.param_groups]
        optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        if isinstance(schedule, sched.ReduceLROnPlateau):
            schedule.step(PLATEAU_METRIC)
        else:
            schedule.step()  # type: ignore[attr-defined]
    return lrs


def adapter_parameters(module: pl.LightningModule) -> list[nn.Parameter]:
    return [
        p for _, layer in sparse_layers(module) if layer.adapter for p in layer.adapter.parameters()
    ]


def test_every_scheduler_class_in_torch_is_covered():
    classes = {
        name
        for name, value in vars(sched).items()
        if isinstance(value, type)
        and issubclass(value, sched.LRScheduler | sched.ReduceLROnPlateau)
        and value not in (sched.LRScheduler, sched._LRScheduler)
    }
    assert classes == set(SCHEDULERS)


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_adapters_train_after_the_start_on_the_scheduler_s_own_learning_rates(scheduler, kind):
    module, recorder, trainer = fit(scheduler, kind)
    groups = trainer.optimizers[0].param_groups
    adapters = adapter_parameters(module)
    assert [group.get("name") for group in groups] == [None, "adapters"]
    # The adapters are in their declared group (and only there), and they trained.
    assert adapters and [id(p) for p in groups[1]["params"]] == [id(p) for p in adapters]
    assert not {id(p) for p in groups[0]["params"]} & {id(p) for p in adapters}
    assert all(
        layer.adapter.up.abs().sum() > 0 for _, layer in sparse_layers(module)
    )  # R = 0 at start
    # Every group's lr at every step is exactly what the scheduler gives the optimizer alone,
    # and the adapters' equals the model's.
    assert recorder.lrs == scheduled_lrs(scheduler, kind)
    assert all(model == adapter for model, adapter in recorder.lrs.values())
    assert len(set(map(tuple, recorder.lrs.values()))) > 1, "the schedule never moved"


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", ["SequentialLR", "ReduceLROnPlateau", "CyclicLR"])
def test_a_run_resumed_after_the_start_ends_bit_for_bit_like_the_uninterrupted_one(
    tmp_path, scheduler, kind
):
    full, full_lrs, _ = fit(scheduler, kind)
    ckpt = tmp_path / "interrupted.ckpt"
    fit(scheduler, kind, stop_at=START + 2, save=ckpt)
    resumed, resumed_lrs, trainer = fit(scheduler, kind, ckpt=ckpt)
    assert sorted(resumed_lrs.lrs) == list(range(START + 2, STEPS))
    assert resumed_lrs.lrs == {s: full_lrs.lrs[s] for s in resumed_lrs.lrs}
    assert trainer.optimizers[0].param_groups[1]["params"], "the adapters were not placed"
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert any(".adapter." in key for key in full_state)
    for key, value in full_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed_state[key]), key


# ------------------------------------------------------------------ errors before the first step


class Undeclared(Regressor):
    """No adapters' group: LazyLoRA would have to extend the scheduler."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        scheduler = SCHEDULERS[self.scheduler](optimizer)
        config = {"scheduler": scheduler, "interval": "step", "monitor": "plateau"}
        return {"optimizer": optimizer, "lr_scheduler": config}


class Declared(Regressor):
    """Declares the adapters' group with its own lr."""

    def __init__(self, adapter_lr: float) -> None:
        super().__init__("SequentialLR", "foreach")
        self.adapter_lr = adapter_lr

    def configure_optimizers(self):
        groups = [{"params": self.parameters()}, adapter_param_group(lr=self.adapter_lr)]
        optimizer = torch.optim.AdamW(groups, lr=LR)
        return [optimizer], [SCHEDULERS["SequentialLR"](optimizer)]


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def quick_trainer(callbacks) -> pl.Trainer:
    return pl.Trainer(
        max_steps=STEPS,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_without_a_declared_group_an_unsupported_scheduler_fails_first_showing_the_fix():
    counter = StepCounter()
    with pytest.raises(ValueError) as error:
        quick_trainer([LazyLoRA(start=START, rank=4), counter]).fit(
            Undeclared("SequentialLR", "foreach"), same_batches()
        )
    assert counter.steps == 0
    message = str(error.value)
    assert "cannot add a param group that follows SequentialLR" in message
    assert (
        'torch.optim.AdamW([{"params": self.parameters()}, adapter_param_group()], lr=...)'
        in message
    )
    assert "from slope_lightning.optim import adapter_param_group" in message


def test_without_a_declared_group_a_supported_scheduler_still_gets_a_new_group():
    module, recorder, trainer = Undeclared("LambdaLR", "foreach"), LrRecorder(), None
    trainer = quick_trainer([LazyLoRA(start=START, rank=4), recorder])
    trainer.fit(module, same_batches())
    groups = trainer.optimizers[0].param_groups
    assert [group.get("name") for group in groups] == [None, "adapters"]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in adapter_parameters(module)]
    assert all(model == adapter for model, adapter in list(recorder.lrs.values())[START + 1 :])


def test_a_lazy_lora_lr_that_differs_from_the_declared_group_s_fails_first_naming_both():
    counter = StepCounter()
    with pytest.raises(
        ValueError, match=r"base lr 0\.002, but lr=0\.005.*adapter_param_group\(lr=0\.005\)"
    ):
        quick_trainer([LazyLoRA(start=START, rank=4, lr=5e-3), counter]).fit(
            Declared(adapter_lr=2e-3), same_batches()
        )
    assert counter.steps == 0


def test_a_lazy_lora_lr_equal_to_the_declared_group_s_trains_at_that_base_lr():
    module, recorder = Declared(adapter_lr=2e-3), LrRecorder()
    quick_trainer([LazyLoRA(start=START, rank=4, lr=2e-3), recorder]).fit(module, same_batches())
    for model, adapter in recorder.lrs.values():  # the same schedule, scaled by 2e-3 / 1e-2
        assert adapter == pytest.approx(model * 0.2, rel=1e-12)
