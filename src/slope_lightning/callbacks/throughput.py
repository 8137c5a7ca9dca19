"""TokenThroughput: tokens per second of training, measured on logging steps only."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from slope_lightning.callbacks.shared import LoggingStepCallback


class _Measurement(NamedTuple):
    """Totals at one measurement: training seconds, batches, samples and tokens."""

    time: float
    batches: int
    samples: int
    tokens: int


class TokenThroughput(LoggingStepCallback):
    """Tokens per second of training with (input, target) token batches, without a host sync
    per batch.

    Each training batch's samples and tokens are counted on the host, from its shape. At the
    end of every logging step (each ``log_every_n_steps`` optimizer steps) the callback waits
    once for the device's queued work (:meth:`synchronize`, a sync point) and reads the
    clock; a rate covers the last ``window_size - 1`` logging intervals. Validation time is
    left out (the clock stops at its start and restarts at its end, a sync point each).
    Lightning's ``ThroughputMonitor``, which this replaces with the same metric names,
    synchronised the device after every batch, micro-batches of gradient accumulation
    included, and measured validation and FLOPs too.

    Metrics (on logging steps, once ``window_size`` measurements were taken):
    ``train/device/items_per_sec`` (tokens per second per device),
    ``train/device/samples_per_sec``, ``train/device/batches_per_sec``, and with several
    devices the same for all of them: ``train/items_per_sec``, ``train/samples_per_sec``,
    ``train/batches_per_sec``.

    Args:
        window_size: measurements (one per logging step) per rate, at least 2 (default 2:
            each rate covers the last logging interval; the first one appears at the second
            logging step).

    Raises:
        ValueError: ``window_size`` is not an int >= 2.

    Example:
        >>> trainer = pl.Trainer(callbacks=[TokenThroughput()])  # doctest: +SKIP
    """

    def __init__(self, window_size: int = 2) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2:
            raise ValueError(
                f"TokenThroughput(window_size={window_size!r}): give an int >= 2 (measurements, "
                "one per logging step, that a rate spans)"
            )
        self.window_size = window_size
        self._window: deque[_Measurement] = deque(maxlen=window_size)
        self._batches = self._samples = self._tokens = 0
        self._train_time = 0.0  # training seconds measured up to self._since
        self._since: float | None = None  # when the running stretch of training began
        self._started = False  # the first measurement was taken

    def synchronize(self, device: torch.device) -> None:
        """Wait until the work queued on ``device`` is done, so that the clock reads the
        time the device took (a sync point). CUDA: ``torch.cuda.synchronize``; other
        devices: nothing. Override it for another accelerator."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _clock(self, trainer: pl.Trainer) -> float:
        self.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._window.clear()
        self._batches = self._samples = self._tokens = 0
        self._train_time, self._since, self._started = 0.0, None, False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Counted as the batch starts; the clock is read at the end of the logging step's
        # last batch, so every measurement covers the same batches as the time it took.
        self._batches += 1
        self._samples += int(batch[0].shape[0])  # shapes: no sync
        self._tokens += int(batch[0].numel())

    @override
    def on_logging_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = self._clock(trainer)  # a sync point, once per logging step
        if self._started and self._since is not None:
            self._train_time += now - self._since
        self._since, self._started = now, True
        self._window.append(
            _Measurement(self._train_time, self._batches, self._samples, self._tokens)
        )
        if len(self._window) < self.window_size:
            return
        first, last = self._window[0], self._window[-1]
        elapsed = last.time - first.time
        if elapsed <= 0:
            return
        metrics: dict[str, float] = {}
        for name, done in (
            ("items", last.tokens - first.tokens),
            ("samples", last.samples - first.samples),
            ("batches", last.batches - first.batches),
        ):
            metrics[f"train/device/{name}_per_sec"] = done / elapsed
            if trainer.world_size > 1:
                metrics[f"train/{name}_per_sec"] = done / elapsed * trainer.world_size
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer) and self._since is not None:
            self._train_time += self._clock(trainer) - self._since  # a sync point
            self._since = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer) and self._started:
            self._since = self._clock(trainer)  # a sync point: validation's work is not timed

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
