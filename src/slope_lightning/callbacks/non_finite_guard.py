"""NonFiniteGuard: a NaN/inf loss or gradient stops the run (or skips the step, a bounded
number of times), and no checkpoint and no end of training (the export) ever sees non-finite
weights.

Host syncs: the checks stay on the device. ``action="skip"`` reads one flag per optimizer step
(it must decide before the update); ``action="stop"`` reads its flag only on logging steps,
before a checkpoint is written and at the end of training.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from slope_lightning.callbacks.shared import (
    LoggingStepCallback,
    all_finite,
    first_non_finite,
    last_good_checkpoint,
    non_finite_weights,
)
from slope_lightning.sparse.dtensor import local_part

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, gradient or weight); the message names the step."""


_ACTIONS = ("stop", "skip")
#: "No non-finite value seen yet" in the device-side record of :class:`NonFiniteGuard`.
_NONE = torch.iinfo(torch.int64).max
#: Slots of that record: the first global step with a non-finite loss, with non-finite
#: gradients, and the optimizer-order index of the first parameter whose gradient was.
_LOSS, _GRAD, _PARAM = 0, 1, 2


class NonFiniteGuard(LoggingStepCallback):
    """Stop (or skip the step) when the loss or the gradients hold NaN/inf.

    * The loss is checked as it reaches ``backward`` (``on_before_backward``), the gradients
      after unscaling and before clipping and the optimizer (``on_before_optimizer_step``),
      on the device: no host sync in either. Under fp16 mixed precision the GradScaler
      already skips steps with inf gradients and lowers its scale, so gradients are then left
      to it and only the loss is checked.
    * ``action="stop"`` (default) raises :class:`NonFiniteError` naming the first bad step.
      The result is read lazily, so a step costs no host sync: on logging steps
      (``log_every_n_steps``), before any checkpoint is written (``on_save_checkpoint``:
      ModelCheckpoint, the crash checkpoint, ``trainer.save_checkpoint``) and at the end of
      training. The bad update and the steps after it (fewer than ``log_every_n_steps``) run
      in memory, but no checkpoint is ever written after it: ``last.ckpt`` and the crash
      checkpoint stay at the last good step, and ``on_train_end`` (the export) never runs.
    * ``action="skip"`` decides before every optimizer step (one host sync per optimizer
      step): it drops a bad step's gradients (``grad = None``: the optimizer leaves those
      parameters and their state untouched; the step still counts for the LR schedule) and
      counts it. More than ``max_skips`` skipped steps in a run stop it, before the update.
      ``NonFiniteGuard("skip", max_skips=0)`` is therefore "stop before the bad update is
      applied", the weights in memory included, for one sync per optimizer step.
    * Defence in depth: a checkpoint about to be written (``on_save_checkpoint``) and the end
      of training (``on_train_end``, before the module exports) are refused if any weight is
      non-finite, whatever put it there.
    * Several processes: the decision is all-reduced, so every rank stops or skips alike.

    The skip count is saved in checkpoints, so a resumed run keeps counting. Logged (skip
    mode, on logging steps): ``faults/skipped_steps``.

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
        # stop mode: (_LOSS, _GRAD, _PARAM) on the device, _NONE until something is seen
        self._first_bad: Tensor | None = None
        # stop mode, once reported: the weights in memory are bad, every later save is refused
        self._failure: str | None = None

    # -- checks ----------------------------------------------------------------------------

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        # No sync: the flag stays on the device.
        finite = loss.detach().isfinite().all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @override
    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss_finite, self._loss_finite = self._loss_finite, None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grad_flags = None if scaler is not None else _grad_flags(params)
        if grad_flags is not None:
            grads_ok = grad_flags.all()
            loss_ok = loss_finite if loss_finite is not None else torch.ones_like(grads_ok)
        elif loss_finite is not None:
            loss_ok, grads_ok = loss_finite, torch.ones_like(loss_finite)
        else:
            return  # nothing to check (no backward through Lightning, no gradients)
        if self.action == "stop":
            self._record(trainer.global_step, loss_ok, grads_ok, grad_flags)
            return
        ok = _agree(trainer, (loss_ok & grads_ok).to(torch.int32), dist.ReduceOp.MIN)
        if ok.item():  # a sync point: skip must decide before the optimizer applies the step
            return
        # The failure path: more syncs are fine here.
        if not _agree(trainer, loss_ok.to(torch.int32), dist.ReduceOp.MIN).item():
            what = "loss"
        else:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            named = ((names.get(id(p), "?"), p.grad) for p in params if p.grad is not None)
            what = f"gradient of {first_non_finite(named) or 'a parameter'}"
        where = (
            f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx})"
        )
        if self.skipped < self.max_skips:
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
        raise NonFiniteError(
            f"non-finite {what} at {where}; {self.skipped} steps were skipped already "
            f"(max_skips={self.max_skips}). The update was not applied: the weights and "
            f"checkpoints stay at the last good step (last checkpoint: "
            f"{last_good_checkpoint(trainer)}). {_ADVICE}"
        )

    def _record(
        self, step: int, loss_ok: Tensor, grads_ok: Tensor, grad_flags: Tensor | None
    ) -> None:
        """Stop mode: remember on the device the first step with a non-finite loss, the first
        with non-finite gradients and the first such parameter (no host sync)."""
        if self._first_bad is None:
            self._first_bad = torch.full((3,), _NONE, dtype=torch.int64, device=loss_ok.device)
        first = self._first_bad
        loss_new = ~loss_ok & (first[_LOSS] == _NONE)
        grad_new = ~grads_ok & (first[_GRAD] == _NONE)
        param = (~grad_flags).to(torch.int64).argmax() if grad_flags is not None else first[_PARAM]
        self._first_bad = torch.stack(
            [
                torch.where(loss_new, step, first[_LOSS]),
                torch.where(grad_new, step, first[_GRAD]),
                torch.where(grad_new, param, first[_PARAM]),
            ]
        )

    def _check_recorded(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str
    ) -> None:
        """Stop mode: read what :meth:`_record` kept (a sync point) and stop if anything was
        non-finite; ``when`` says where in the run this reading is, for the message."""
        if self._failure is not None:
            raise NonFiniteError(f"{when}: {self._failure}")
        if self._first_bad is None:
            if trainer.world_size == 1:
                return  # nothing recorded since the last reading
            # Every rank takes part in the reduction, whatever it recorded.
            device = trainer.strategy.root_device
            self._first_bad = torch.full((3,), _NONE, dtype=torch.int64, device=device)
        first = _agree(trainer, self._first_bad, dist.ReduceOp.MIN)
        if not bool((first != _NONE).any().item()):  # a sync point (see the class docstring)
            self._first_bad = None  # all good so far: start a new record
            return
        loss_step, grad_step, index = (int(v) for v in first.cpu())  # the failure path
        if loss_step <= grad_step:
            what, step = "loss", loss_step
        else:
            params = [
                p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
            ]
            names = {id(p): n for n, p in pl_module.named_parameters()}
            name = names.get(id(params[index]), "?") if index < len(params) else "a parameter"
            what, step = f"gradient of {name}", grad_step
        self._failure = (
            f"non-finite {what} at global step {step}. No checkpoint was written since then: "
            f"the checkpoints stay at the last good step (last checkpoint: "
            f"{last_good_checkpoint(trainer)}); the weights in memory are not saved and the "
            f"model is not exported. {_ADVICE}"
        )
        raise NonFiniteError(f"{when}: {self._failure}")

    @override
    def on_logging_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.action == "stop":
            self._check_recorded(
                trainer, pl_module, f"NonFiniteGuard at global step {trainer.global_step}"
            )
        else:
            pl_module.log("faults/skipped_steps", float(self.skipped), on_step=True)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        refusal = f"refusing to write a checkpoint at global step {trainer.global_step}"
        self._check_recorded(trainer, pl_module, refusal)
        state = checkpoint.get("state_dict", {})
        tensors = [t for t in state.values() if isinstance(t, Tensor)]
        if all_finite(tensors):  # a sync point, once per checkpoint
            return
        bad = first_non_finite((k, v) for k, v in state.items() if isinstance(v, Tensor))
        raise NonFiniteError(
            f"{refusal}: weight {bad} is not finite. The previous checkpoints are kept (last: "
            f"{last_good_checkpoint(trainer)}); lower the learning rate or check the data, "
            "then resume from one of them"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks' on_train_end runs before the LightningModule's, which exports the model.
        self._check_recorded(
            trainer, pl_module, f"training ended at global step {trainer.global_step}"
        )
        bad = non_finite_weights(pl_module)  # a sync point, once per run
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


_ADVICE = (
    "Lower model.optimizer.lr or raise warmup, check the data, or use "
    "NonFiniteGuard(action='skip', max_skips=N); resume with --ckpt_path last"
)


def _grad_flags(params: list[Tensor]) -> Tensor | None:
    """One bool per parameter, in ``params``' order, on the device: its gradient (this rank's
    part of a sharded one) is free of NaN/inf, or it has none. None without any gradient.
    No host sync."""
    flags: list[Tensor | None] = []
    device = None
    for p in params:
        grad = p.grad
        if grad is None:
            flags.append(None)
            continue
        local = local_part(grad.detach())
        if local.is_floating_point() and local.numel():
            flags.append(local.isfinite().all())
            device = local.device
        else:
            flags.append(None)
    if device is None:
        return None
    true = torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([true if f is None else f for f in flags])


def _agree(trainer: pl.Trainer, value: Tensor, op: Any) -> Tensor:
    """``value`` reduced with ``op`` over every process (itself on one process), so that
    every rank takes the same decision. A collective, not a host sync."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value
