"""Host syncs outside the layers (issue 18, item 9): a training step through the callbacks
reads nothing back from the device, except where a callback's job needs it, and then at most
once per optimizer step or only on logging steps.

A sync is counted where it happens: a tensor read on the host (``.item()``, ``int()``,
``bool()``) dispatches ``aten._local_scalar_dense``, which a ``TorchDispatchMode`` records
around each of the callback's hooks (on CPU the same code runs as on a GPU). TokenThroughput's
device wait is counted through its :meth:`~TokenThroughput.synchronize` seam.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from slope_lightning import sparsify
from slope_lightning.callbacks import MaskScheduler, NonFiniteGuard, TokenThroughput
from slope_lightning.sparse import SparseLinear, sparse_layers

_READ = torch.ops.aten._local_scalar_dense.default


class _CountReads(TorchDispatchMode):
    """Counts host reads of tensor values (``_local_scalar_dense``) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is _READ:
            self.reads += 1
        return func(*args, **(kwargs or {}))


_HOOKS = (
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class Counted(Callback):
    """Runs ``inner``'s training hooks under :class:`_CountReads` and records the host reads
    of each, by (global step, hook); every other hook is forwarded as is."""

    def __init__(self, inner: Callback) -> None:
        self.inner = inner
        self.reads: Counter[tuple[int, str]] = Counter()

    @property
    def state_key(self) -> str:
        return f"Counted[{self.inner.state_key}]"

    def __getattribute__(self, name: str) -> Any:
        if name in _HOOKS:
            inner, reads = object.__getattribute__(self, "inner"), self.reads

            def hook(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
                with _CountReads() as counter:
                    result = getattr(inner, name)(trainer, *args, **kwargs)
                reads[(trainer.global_step, name)] += counter.reads
                return result

            return hook
        if name in ("setup", "on_fit_start", "on_train_end", "on_save_checkpoint", "teardown"):
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)

    def per_step(self) -> dict[int, int]:
        """Host reads by the global step the hook ran at."""
        steps: Counter[int] = Counter()
        for (step, _), count in self.reads.items():
            steps[step] += count
        return dict(steps)


class Regression(pl.LightningModule):
    """A sparse MLP (two SparseLinear layers) on a regression task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        sparsify(self.net)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader(batches: int = 24) -> DataLoader:
    x = torch.randn(batches * 4, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.flip(-1)), batch_size=4)


def _fit(callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_steps": 6,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 3,
        **kwargs,
    }
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(Regression(), _loader())
    return trainer


# --------------------------------------------------------------------------------------------
# NonFiniteGuard
# --------------------------------------------------------------------------------------------


def test_the_counter_sees_item_int_and_bool():
    with _CountReads() as counter:
        value = torch.tensor([1.0, 2.0]).sum()
        value.item(), int(value), bool(value)
    assert counter.reads == 3


def test_guard_in_stop_mode_reads_the_device_only_on_logging_steps():
    guard = Counted(NonFiniteGuard("stop"))
    _fit([guard], max_steps=7, accumulate_grad_batches=2)
    # The loss and gradient checks stay on the device.
    assert all(n == 0 for (_, hook), n in guard.reads.items() if hook != "on_train_batch_end")
    # One read at the end of each logging step (3 and 6), none on the others (at step 0,
    # after the first micro-batch, nothing was recorded yet).
    ends = {step: n for (step, hook), n in guard.reads.items() if hook == "on_train_batch_end"}
    assert ends == {0: 0, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 1, 7: 0}


def test_guard_in_skip_mode_reads_one_flag_per_optimizer_step():
    guard = Counted(NonFiniteGuard("skip"))
    _fit([guard], max_steps=6, accumulate_grad_batches=2)
    assert guard.per_step() == {**{step: 1 for step in range(6)}, 6: 0}
    assert all(n == 1 for (_, hook), n in guard.reads.items() if hook == "on_before_optimizer_step")


# --------------------------------------------------------------------------------------------
# MaskScheduler
# --------------------------------------------------------------------------------------------


def test_mask_scheduler_reads_nothing_from_the_device_on_any_step():
    scheduler = Counted(MaskScheduler(every=1))
    trainer = _fit([scheduler], max_steps=7, log_every_n_steps=3)
    assert sum(scheduler.reads.values()) == 0
    assert scheduler.inner.refreshes == 6  # it did refresh, and logged on steps 3 and 6:
    assert 0.6 < float(trainer.callback_metrics["sparsity/wrc_kept_fraction"]) < 1.0


def test_mask_scheduler_statistics_equal_the_layers_own():
    torch.manual_seed(0)
    layers = [SparseLinear.from_linear(nn.Linear(32, 16)) for _ in range(2)]
    twins = [SparseLinear.from_linear(nn.Linear(32, 16)) for _ in range(2)]
    for layer, twin in zip(layers, twins, strict=True):
        twin.load_state_dict(layer.state_dict())
        with torch.no_grad():  # "a step": new values, so M_C changes
            noise = torch.randn(layer.values.shape)
            layer.values.add_(noise)
            twin.values.add_(noise)

    class Twins(nn.Module):
        def __init__(self, members: list[SparseLinear]) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)

    module, reference = pl.LightningModule(), Twins(twins)
    module.net = Twins(layers)
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda metrics, **_: logged.update(metrics)  # type: ignore[method-assign]

    class _Trainer:
        global_step, log_every_n_steps = 1, 1

    scheduler = MaskScheduler(every=1)
    scheduler.on_train_batch_start(_Trainer(), module, None, 0)  # type: ignore[arg-type]
    expected = [
        layer.refresh_transpose_mask(with_stats=True) for _, layer in sparse_layers(reference)
    ]
    kept = sum(r.kept for r in expected if r)
    total = sum(r.total for r in expected if r)
    flipped = sum(r.flipped for r in expected if r)
    assert flipped > 0
    assert float(logged["sparsity/wrc_kept_fraction"]) == pytest.approx(kept / total)
    assert float(logged["sparsity/mc_flipped"]) == flipped
    for (_, a), (_, b) in zip(sparse_layers(module.net), sparse_layers(reference), strict=True):
        assert torch.equal(a.col_index, b.col_index)


# --------------------------------------------------------------------------------------------
# TokenThroughput
# --------------------------------------------------------------------------------------------


class CountingThroughput(TokenThroughput):
    """TokenThroughput whose device waits are counted, by the global step they happen at."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.waits: list[int] = []
        self.trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        super().on_train_start(trainer, pl_module)

    def synchronize(self, device: torch.device) -> None:
        assert self.trainer is not None
        self.waits.append(self.trainer.global_step)


def test_token_throughput_waits_for_the_device_on_logging_steps_only():
    throughput = CountingThroughput()
    trainer = _fit([throughput], max_steps=9, accumulate_grad_batches=4, log_every_n_steps=3)
    # 36 micro-batches, but one wait per logging step (step 0's: the clock starts there).
    assert throughput.waits == [0, 3, 6, 9]
    rate = float(trainer.callback_metrics["train/device/items_per_sec"])
    assert rate > 0
    assert float(trainer.callback_metrics["train/device/samples_per_sec"]) == pytest.approx(
        rate / 16
    )  # 16 values per sample: items are tokens, here features


def test_token_throughput_stops_its_clock_for_validation():
    class SlowValidation(Regression):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            import time

            time.sleep(1.0)

    throughput = CountingThroughput()
    trainer = pl.Trainer(
        callbacks=[throughput],
        max_steps=4,
        log_every_n_steps=2,
        val_check_interval=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(SlowValidation(), _loader(), _loader(2))
    assert throughput.waits == [2, 3, 3, 4]  # logging steps, and validation's start and end
    # The rate covers steps 3 and 4; counted, the 2 s of validation between them would make
    # it less than 1 batch per second.
    timed = 2 / float(trainer.callback_metrics["train/device/batches_per_sec"])
    assert timed < 1.5


@pytest.mark.parametrize("window_size", [1, 0, 2.5, True])
def test_token_throughput_window_is_validated(window_size):
    with pytest.raises(ValueError, match=f"window_size={window_size!r}"):
        TokenThroughput(window_size=window_size)
