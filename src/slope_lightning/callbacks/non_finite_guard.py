"""NonFiniteGuard: a NaN/inf loss or gradient stops the run (or skips the step, a bounded
number of times) before the optimizer applies it, and no checkpoint and no end of training
(the export) ever sees non-finite weights."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from slope_lightning.callbacks.shared import (
    all_finite,
    first_non_finite,
    last_good_checkpoint,
    non_finite_weights,
)

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, gradient or weight); the message names the step."""


_ACTIONS = ("stop", "skip")


class NonFiniteGuard(Callback):
    """Stop (or skip the step) when the loss or the gradients hold NaN/inf, before the update.

    * The loss is checked as it reaches ``backward`` (``on_before_backward``), the gradients
      after unscaling and before clipping and the optimizer (``on_before_optimizer_step``):
      one device sync per optimizer step. Under fp16 mixed precision the GradScaler already
      skips steps with inf gradients and lowers its scale, so gradients are then left to it
      and only the loss is checked.
    * ``action="stop"`` raises :class:`NonFiniteError` naming the step: the optimizer never
      applies the bad update, so the weights, ``last.ckpt`` and the crash checkpoint stay at the
      last good step, and ``on_train_end`` (the export) never runs.
    * ``action="skip"`` drops the step's gradients (``grad = None``: the optimizer leaves
      those parameters and their state untouched; the step still counts for the LR schedule)
      and counts it. More than ``max_skips`` skipped steps in a run stop it as above.
    * Defence in depth: a checkpoint about to be written (``on_save_checkpoint``) and the end
      of training (``on_train_end``, before the module exports) are refused if any weight is
      non-finite, whatever put it there.

    The skip count is saved in checkpoints, so a resumed run keeps counting. Logged (skip
    mode): ``faults/skipped_steps``.

    Args:
        action: "stop" (default) or "skip".
        max_skips: skipped steps allowed in skip mode before the run stops (default 10).

    Raises:
        ValueError: an unknown ``action``, or ``max_skips`` not an int >= 0.
        NonFiniteError: during training, as described above.

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuard("skip", max_skips=5)])  # doctest: +SKIP
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        if action not in _ACTIONS:
            raise ValueError(
                f"NonFiniteGuard(action={action!r}): choose one of {', '.join(_ACTIONS)}"
            )
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(
                f"NonFiniteGuard(max_skips={max_skips!r}): give an int >= 0 (skipped steps "
                "allowed before the run stops)"
            )
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self._loss_finite: Tensor | None = None  # AND of this step's micro-batch losses

    # -- checks ----------------------------------------------------------------------------

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # No sync here: the flag stays on the device until the optimizer step reads it.
        finite = loss.detach().isfinite().all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        loss_ok = True if self._loss_finite is None else bool(self._loss_finite.item())
        self._loss_finite = None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad.detach() for p in params if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_ok = True if scaler is not None else all_finite(grads)  # one sync
        if loss_ok and grads_ok:
            return
        if not loss_ok:
            what = "loss"
        else:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            named = ((names.get(id(p), "?"), p.grad) for p in params if p.grad is not None)
            what = f"gradient of {first_non_finite(named) or 'a parameter'}"
        where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx})"
        )
        if self.action == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            for p in params:
                p.grad = None  # the optimizer skips parameters without gradients
            logger.warning(
                "NonFiniteGuard: non-finite %s at %s; skipped this optimizer step (%d of at "
                "most %d)",
                what,
                where,
                self.skipped,
                self.max_skips,
            )
            return
        limit = (
            f"; {self.skipped} steps were skipped already (max_skips={self.max_skips})"
            if self.action == "skip"
            else ""
        )
        raise NonFiniteError(
            f"non-finite {what} at {where}{limit}. The update was not applied: the weights and "
            f"checkpoints stay at the last good step (last checkpoint: "
            f"{last_good_checkpoint(trainer)}). Lower model.optimizer.lr or raise warmup, "
            "check the data, or use NonFiniteGuard(action='skip', max_skips=N); resume with "
            "--ckpt_path last"
        )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.action == "skip":
            pl_module.log("faults/skipped_steps", float(self.skipped), on_step=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict", {})
        tensors = [t for t in state.values() if isinstance(t, Tensor)]
        if all_finite(tensors):
            return
        bad = first_non_finite((k, v) for k, v in state.items() if isinstance(v, Tensor))
        raise NonFiniteError(
            f"refusing to write a checkpoint at global step {trainer.global_step}: weight "
            f"{bad} is not finite. The previous checkpoints are kept (last: "
            f"{last_good_checkpoint(trainer)}); lower the learning rate or check the data, "
            "then resume from one of them"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks' on_train_end runs before the LightningModule's, which exports the model.
        bad = non_finite_weights(pl_module)
        if bad is not None:
            raise NonFiniteError(
                f"training ended at global step {trainer.global_step} with non-finite weight "
                f"{bad}; the model is not exported. Resume from the last good checkpoint "
                f"({last_good_checkpoint(trainer)}) with a lower learning rate"
            )

    # -- state ------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
