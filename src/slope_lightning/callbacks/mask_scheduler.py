"""MaskScheduler: re-derive the double-pruned transposed mask M_C on a schedule, and log it.

It owns the M_C schedule (a :class:`~slope_lightning.callbacks.shared.MaskScheduleOwner`):
while it is attached, the SLoPe callback reports no optimizer step to the layers.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from slope_lightning.callbacks.shared import (
    MaskScheduleOwner,
    Schedule,
    log_interval,
    sparse_layers_after_conversion,
)
from slope_lightning.sparse import sparse_layers

logger = logging.getLogger(__name__)


class MaskScheduler(MaskScheduleOwner):
    """Re-derive every layer's double-pruned transposed mask M_C on a schedule, and log it.

    While this callback is attached it owns the schedule: when training starts it switches the
    layers' automatic refresh off, then refreshes M_C from the current W_R before the forward
    of every step that the schedule selects. Logged (on logging steps, under ``sparsity/``):
    ``wrc_kept_fraction`` (nonzeros of W_RC over those of W_R), ``backward_dropped_fraction``
    (its complement) and ``mc_flipped`` (entries of M_C that changed since the previous
    refresh, all layers). Idle, with one warning, on a module without sparse layers.

    Args:
        every: refresh every this many optimizer steps (default 1, as the paper's accuracy
            runs), or a callable ``step -> bool`` that says whether to refresh at a step.

    Raises:
        ValueError: if ``every`` is neither a positive int nor a callable.

    Example:
        >>> trainer = pl.Trainer(callbacks=[MaskScheduler(every=100)])  # doctest: +SKIP
    """

    def __init__(self, every: Schedule = 1) -> None:
        if not callable(every) and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(
                f"MaskScheduler(every={every!r}): give a positive number of optimizer steps "
                "or a callable step -> bool"
            )
        self.every = every
        self.last_refresh_step = 0
        self.refreshes = 0
        self.idle = False

    def _due(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step > 0 and step - self.last_refresh_step >= self.every

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, so a model sparsified there is seen too.
        layers = sparse_layers_after_conversion(trainer, pl_module, "MaskScheduler")
        self.idle = not layers
        for _, layer in layers:
            layer.transpose_mask_interval = None  # this callback owns the schedule now

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.idle or step == self.last_refresh_step or not self._due(step):
            return
        log_now = step % log_interval(trainer) == 0
        kept = total = flipped = 0
        for _, layer in sparse_layers(pl_module):
            refresh = layer.refresh_transpose_mask(with_stats=log_now)
            if refresh is not None:
                kept, total, flipped = (
                    kept + refresh.kept,
                    total + refresh.total,
                    flipped + refresh.flipped,
                )
        self.last_refresh_step = step
        self.refreshes += 1
        if log_now and total:
            pl_module.log_dict(
                {
                    "sparsity/wrc_kept_fraction": kept / total,
                    "sparsity/backward_dropped_fraction": 1.0 - kept / total,
                    "sparsity/mc_flipped": float(flipped),
                },
                on_step=True,
                on_epoch=False,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh_step": self.last_refresh_step, "refreshes": self.refreshes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh_step = int(state_dict["last_refresh_step"])
        self.refreshes = int(state_dict["refreshes"])
