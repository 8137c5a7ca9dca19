"""MaskScheduler: re-derive the double-pruned transposed mask M_C on a schedule, and log it.

It owns the M_C schedule (a :class:`~slope_lightning.callbacks.shared.MaskScheduleOwner`):
while it is attached, the SLoPe callback reports no optimizer step to the layers.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from slope_lightning.callbacks.shared import (
    MaskScheduleOwner,
    Schedule,
    log_interval,
    sparse_layers_after_conversion,
)
from slope_lightning.sparse import SparseLinear, sparse_layers
from slope_lightning.sparse.dtensor import is_dtensor, local_part

logger = logging.getLogger(__name__)


class MaskScheduler(MaskScheduleOwner):
    """Re-derive every layer's double-pruned transposed mask M_C on a schedule, and log it.

    While this callback is attached it owns the schedule: when training starts it switches the
    layers' automatic refresh off, then refreshes M_C from the current W_R before the forward
    of every step that the schedule selects. Logged (on logging steps, under ``sparsity/``):
    ``wrc_kept_fraction`` (nonzeros of W_RC over those of W_R), ``backward_dropped_fraction``
    (its complement) and ``mc_flipped`` (entries of M_C that changed since the previous
    refresh, all layers). Idle, with one warning, on a module without sparse layers.

    No host sync: the statistics are counted and summed over the layers on the device and
    logged as tensors, which Lightning converts when it writes the logs. (Under FSDP2 the
    layers' own statistics are used: one sync per layer, on logging steps only.)

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
        counts: Tensor | None = None  # (kept, flipped), summed over the layers on the device
        total = 0
        for _, layer in sparse_layers(pl_module):
            if not log_now:
                layer.refresh_transpose_mask(with_stats=False)
                continue
            layer_counts = _refresh_with_counts(layer)
            counts = layer_counts if counts is None else counts + layer_counts
            total += layer.values.numel()
        self.last_refresh_step = step
        self.refreshes += 1
        if counts is not None and total:
            # Logged as device tensors: no host sync here. Lightning converts them when it
            # writes the step's logs (the sync it makes for every logged metric anyway).
            kept = counts[0].to(torch.float32) / total  # float32, as Lightning logs floats
            pl_module.log_dict(
                {
                    "sparsity/wrc_kept_fraction": kept,
                    "sparsity/backward_dropped_fraction": 1.0 - kept,
                    "sparsity/mc_flipped": counts[1].to(torch.float32),
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


def _refresh_with_counts(layer: SparseLinear) -> Tensor:
    """Refresh ``layer``'s M_C and count, on the device, what the refresh gives: the
    nonzeros of W_RC (kept) and the entries of M_C that were not kept before (flipped), as an
    int64 tensor ``(kept, flipped)``; no host sync.

    A layer whose values FSDP2 shards (DTensor) counts through its own
    :meth:`~slope_lightning.sparse.SparseLinear.refresh_transpose_mask` statistics (a
    collective, and a sync point, on logging steps only); returned then on the values' device.
    """
    if is_dtensor(layer.values):
        refresh = layer.refresh_transpose_mask(with_stats=True)  # a sync point (FSDP2 only)
        assert refresh is not None  # with_stats=True always reports
        device = local_part(layer.values).device
        return torch.tensor([refresh.kept, refresh.flipped], dtype=torch.int64, device=device)
    old = layer.col_index.detach().clone()  # packed: a fraction of the values' size
    layer.refresh_transpose_mask(with_stats=False)
    t_layout = layer.layout.transposed()
    with torch.no_grad():
        new_mask = t_layout.mask(layer.col_index)  # (d_in, d_out), transient
        flipped = (new_mask & ~t_layout.mask(old)).sum()
        kept = (new_mask & layer.layout.mask(layer.row_index).t()).sum()
    return torch.stack([kept, flipped])
