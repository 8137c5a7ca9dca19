"""Fault handling for training runs: safe checkpoint loading, crash checkpoints, NaN guard.

* :func:`load_checkpoint_file` / :class:`SafeCheckpointIO`: every checkpoint is read with
  ``torch.load(..., weights_only=True)`` whatever the torch version's default, and a file that
  is unsafe, truncated or not a checkpoint fails with an error naming the file and the fix.
* :class:`CrashCheckpoint`: a checkpoint when training dies (an exception or Ctrl-C), written
  only for a failure *during* training, never over a newer one, never from non-finite
  weights, and rewound to the last optimizer-step boundary so that a resume logs the same
  steps and validates at the same steps as an uninterrupted run.
* :class:`NonFiniteGuard`: a NaN/inf loss or gradient stops the run (or skips the step, a
  bounded number of times) before the optimizer applies it, and no checkpoint and no end of
  training (the export) ever sees non-finite weights.
* :func:`find_resume_checkpoint`: what ``--ckpt_path last`` means for the CLI.

Why CrashCheckpoint does not subclass Lightning's ``OnExceptionCheckpoint``: Lightning
(2.6, ``_CheckpointConnector._parse_ckpt_path``) turns ``fit(ckpt_path=None)`` into
``ckpt_path="last"`` whenever an ``OnExceptionCheckpoint`` instance is among the callbacks, so
every plain ``fit`` silently resumed from whatever checkpoint it found. A plain
:class:`~lightning.pytorch.callbacks.Checkpoint` subclass keeps ``fit`` a fresh start.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

from slope_lightning.utils import atomic_path

logger = logging.getLogger(__name__)

#: Sub-directory of a run's log directory that holds its crash checkpoint.
CRASH_DIRNAME = "crash"
#: Sub-directory of a run's log directory that holds ModelCheckpoint's files (Lightning's).
CHECKPOINTS_DIRNAME = "checkpoints"

_MAX_REASON = 300  # characters of an underlying error quoted in our messages


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot or must not be loaded (unsafe, truncated, not ours)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, gradient or weight); the message names the step."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= _MAX_REASON else line[:_MAX_REASON] + "..."


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)``, explicitly.

    ``weights_only=True`` unpickles tensors and plain containers only, so a file crafted to run
    code when unpickled is refused instead of executed (torch only made it the default in 2.6).

    Args:
        path: a local checkpoint file.
        map_location: as for ``torch.load`` (default: CPU).
        mmap: memory-map the tensors instead of reading them (cheap peeks at large files).

    Returns:
        The checkpoint dictionary.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file holds objects other than tensors and plain containers
            (unsafe), is truncated or corrupt, or is not a checkpoint dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass an existing .ckpt file, or `last` for "
            "the latest run's checkpoint"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds objects other than tensors and "
            f"plain containers ({_first_line(error)}). Checkpoints written by slope-lightning "
            "never do, so this file is not one of ours or was tampered with; delete it, or "
            "resume from a checkpoint you trust"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt (for instance "
            f"written during a crash or on a full disk): {_first_line(error)}. Delete it and "
            "resume from another checkpoint of the run (e.g. its crash/ or checkpoints/ "
            "directory), or start a new run"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning "
            "checkpoint dictionary; pass a .ckpt file written by the Trainer"
        )
    return checkpoint


#: The file of a sharded (distributed) Lightning checkpoint directory that holds everything
#: but the tensors, ``global_step`` included; rank 0 writes it after the shards.
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a directory of shards written by
    ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` with its ``meta.pt``."""
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA).is_file()


def _checkpoint_mtime(path: Path) -> float:
    """When a checkpoint was completed: a file's mtime, a sharded directory's ``meta.pt``'s."""
    return (path / SHARDED_METADATA if path.is_dir() else path).stat().st_mtime


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` recorded in a Lightning checkpoint, read safely and cheaply.

    The file is memory-mapped (``weights_only=True``), so large checkpoints are not read. A
    sharded checkpoint (a directory, from FSDP2) is read from its ``meta.pt`` alone.

    Args:
        path: a checkpoint file, or a sharded checkpoint directory.

    Returns:
        Its global step (optimizer steps taken).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory that is not a sharded
            checkpoint.
        CheckpointError: the file is unsafe, corrupt, or has no integer ``global_step``.
    """
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise FileNotFoundError(
                f"checkpoint {path} is a directory but not a sharded Lightning checkpoint (it "
                f"has no {SHARDED_METADATA}); pass a .ckpt file, the directory a sharded save "
                "wrote (e.g. checkpoints/last.ckpt/ under FSDP2), or `last`"
            )
        path = path / SHARDED_METADATA
    checkpoint = load_checkpoint_file(path, mmap=True)
    step = checkpoint.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(
            f"checkpoint {path} records no global_step (got {step!r}): it is not a Lightning "
            "training checkpoint; pass one written by the Trainer during fit"
        )
    return step


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but every load is ``weights_only=True``, explicitly, and
    every local save is atomic.

    Lightning passes ``weights_only=None`` unless told otherwise, which on torch < 2.6 means
    full unpickling: a crafted ``last.ckpt`` would run code on ``--ckpt_path last``. This
    plugin refuses ``weights_only=False`` and reports unreadable files by name. Saves go to a
    temporary file beside the target, renamed over it once complete: a crash or a full disk
    mid-write leaves the previous checkpoint, never a truncated one.

    Raises:
        CheckpointError: from :meth:`load_checkpoint`, for ``weights_only=False`` or a file
            that is unsafe, corrupt or not a checkpoint.
        FileNotFoundError: from :meth:`load_checkpoint`, for a missing file.

    Example:
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()])  # doctest: +SKIP
    """

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                f"refusing to load {path} with weights_only=False: slope-lightning loads "
                "checkpoints with weights_only=True only (plain tensors and containers); drop "
                "--weights_only false"
            )
        if "://" in str(path):  # remote (fsspec): Lightning's reader, still weights_only
            try:
                return super().load_checkpoint(path, map_location, weights_only=True)
            except pickle.UnpicklingError as error:
                raise CheckpointError(
                    f"refusing to load checkpoint {path}: {_first_line(error)}"
                ) from error
        return load_checkpoint_file(path, map_location if map_location is not None else "cpu")

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote (fsspec): Lightning's writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


# --------------------------------------------------------------------------------------------
# Finite checks
# --------------------------------------------------------------------------------------------


def _local(tensor: Tensor) -> Tensor:
    """A sharded tensor's (FSDP2 DTensor's) part on this rank; any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _all_finite(tensors: list[Tensor]) -> bool:
    """True if every floating-point tensor is free of NaN/inf, on every rank when any tensor
    is sharded. One device sync (``.item``), plus one all-reduce for sharded tensors."""
    local = [_local(t) for t in tensors]
    flags = [t.isfinite().all() for t in local if t.is_floating_point() and t.numel()]
    ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    sharded = any(t is not lt for t, lt in zip(tensors, local, strict=True))
    if sharded and dist.is_available() and dist.is_initialized():
        device = local[0].device if local else torch.device("cpu")
        flag = ok.to(device=device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank decides alike
        ok = flag.bool()
    return bool(ok.item())


def _first_non_finite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """Name and content of the first tensor with NaN/inf (the slow path: after a failure);
    a sharded tensor is judged by this rank's part."""
    for name, full in named:
        tensor = _local(full)
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            nan = int(tensor.isnan().sum())
            inf = int(tensor.isinf().sum())
            return f"{name} ({nan} NaN, {inf} inf of {tensor.numel()} values)"
    return None


def _non_finite_weights(module: torch.nn.Module) -> str | None:
    params = list(module.named_parameters())
    if _all_finite([p.detach() for _, p in params]):
        return None
    return _first_non_finite((n, p.detach()) for n, p in params) or "a parameter"


def _last_good_checkpoint(trainer: pl.Trainer) -> str:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path or "none written yet"


# --------------------------------------------------------------------------------------------
# NonFiniteGuard
# --------------------------------------------------------------------------------------------

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
        grads_ok = True if scaler is not None else _all_finite(grads)  # one sync
        if loss_ok and grads_ok:
            return
        if not loss_ok:
            what = "loss"
        else:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            named = ((names.get(id(p), "?"), p.grad) for p in params if p.grad is not None)
            what = f"gradient of {_first_non_finite(named) or 'a parameter'}"
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
            f"{_last_good_checkpoint(trainer)}). Lower model.optimizer.lr or raise warmup, "
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
        if _all_finite(tensors):
            return
        bad = _first_non_finite((k, v) for k, v in state.items() if isinstance(v, Tensor))
        raise NonFiniteError(
            f"refusing to write a checkpoint at global step {trainer.global_step}: weight "
            f"{bad} is not finite. The previous checkpoints are kept (last: "
            f"{_last_good_checkpoint(trainer)}); lower the learning rate or check the data, "
            "then resume from one of them"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks' on_train_end runs before the LightningModule's, which exports the model.
        bad = _non_finite_weights(pl_module)
        if bad is not None:
            raise NonFiniteError(
                f"training ended at global step {trainer.global_step} with non-finite weight "
                f"{bad}; the model is not exported. Resume from the last good checkpoint "
                f"({_last_good_checkpoint(trainer)}) with a lower learning rate"
            )

    # -- state ------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# --------------------------------------------------------------------------------------------
# CrashCheckpoint
# --------------------------------------------------------------------------------------------


class CrashCheckpoint(Checkpoint):
    """Write a checkpoint when training dies (an exception, Ctrl-C), safely.

    Differences from Lightning's ``OnExceptionCheckpoint``:

    * **Only during training**: from ``on_train_start`` to ``on_fit_end``. A failed start
      (a corrupt ``last.ckpt``, a bad config, the sanity check) writes nothing.
    * **Never older over newer**: an existing crash checkpoint whose ``global_step`` (read with
      ``weights_only=True``) is at least the current step is kept. Nothing is written either
      when no optimizer step happened since the run started or resumed.
    * **Never non-finite**: weights with NaN/inf are not written.
    * **Consistent**: the Trainer's loop counters are rewound to the last optimizer-step
      boundary before the save, in the layout of a checkpoint saved at ``on_train_batch_end``
      (the one Lightning's restart logic is built for), with a validation that was due but
      not finished marked as pending. Resuming from it logs the same steps and validates at
      the same steps as an uninterrupted run. Without the rewind an interrupt between batches
      shifted every logged step by one and validated one step early. An exception while the
      optimizer was applying an update leaves the weights half-updated: nothing is written.
    * **Atomic**: written to a temporary name and renamed.
    * Not an ``OnExceptionCheckpoint``, so a plain ``fit`` never resumes from it by itself (see
      the module docstring); resume explicitly with the file or the CLI's ``--ckpt_path last``.

    After a successful fit the run's crash checkpoint (older than its final state) is removed.

    Args:
        dirpath: directory of the file; None: ``<trainer.log_dir>/crash`` (one per run).
        filename: file name without the ``.ckpt`` extension.

    Raises:
        ValueError: an empty ``filename`` or one with a path separator.

    Example:
        >>> trainer = pl.Trainer(callbacks=[CrashCheckpoint()])  # doctest: +SKIP
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception") -> None:
        super().__init__()
        if not filename or "/" in filename or os.sep in filename:
            raise ValueError(
                f"CrashCheckpoint(filename={filename!r}): give a plain file name without "
                "extension or directory, e.g. 'on_exception'"
            )
        self.dirpath = dirpath
        self.filename = filename
        self._training = False
        self._snapshot: dict[str, Any] | None = None  # loop state at the last step boundary
        self._snapshot_step: int | None = None
        self._updating_from: int | None = None  # global step whose update is in progress
        self._val_started_at: int | None = None  # processed batches when validation began
        self._val_ended_at: int | None = None

    @property
    def ckpt_path(self) -> str:
        """Where the crash checkpoint goes (known once ``setup`` has run without dirpath)."""
        return os.path.join(self.dirpath or CRASH_DIRNAME, self.filename + self.FILE_EXTENSION)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            # trainer.log_dir is a collective under DDP: every rank asks for it.
            root = trainer.log_dir or trainer.default_root_dir
            self.dirpath = os.path.join(root, CRASH_DIRNAME)

    # -- tracking ---------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        self._snapshot = None
        self._snapshot_step = trainer.global_step
        self._updating_from = None
        self._val_started_at = self._val_ended_at = None

    @override
    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        # Checkpoint callbacks run after all others: the update is about to be applied.
        self._updating_from = trainer.global_step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._updating_from = None
        if trainer.global_step != self._snapshot_step:
            # An optimizer step happened in this batch: this is a step boundary. The loop
            # state is a few dozen ints (tens of microseconds).
            self._snapshot = trainer.fit_loop.state_dict()
            self._snapshot_step = trainer.global_step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training and not trainer.sanity_checking:
            self._val_started_at = _processed(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last hook before Lightning sends the validation metrics to the loggers (there is
        # none after it and before on_validation_end, whose other callbacks, e.g. a
        # ModelCheckpoint save on a full disk, may fail after the metrics were logged). Seen
        # as finished from here, an interrupted validation is never logged twice.
        if self._training and not trainer.sanity_checking:
            self._val_ended_at = _processed(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False
        path = Path(self.ckpt_path)
        if trainer.is_global_zero and path.is_file():
            path.unlink()
            logger.info("training finished; removed the older crash checkpoint %s", path)

    # -- the save ---------------------------------------------------------------------------

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self._training or trainer.state.fn != TrainerFn.FITTING:
            return  # a failed start: the checkpoint resumed from (if any) is still the latest
        self._training = False
        try:
            self._save(trainer, pl_module, exception)
        except Exception as error:  # never mask the exception that is ending the run
            logger.error(
                "CrashCheckpoint: could not write %s: %s: %s",
                self.ckpt_path,
                type(error).__name__,
                _first_line(error),
            )

    def _save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        path = Path(self.ckpt_path)
        state, reason = self._consistent_loop_state(trainer)
        if state is None:
            logger.warning("CrashCheckpoint: no crash checkpoint written: %s", reason)
            return
        bad = _non_finite_weights(pl_module)
        if bad is not None:
            logger.warning(
                "CrashCheckpoint: no crash checkpoint written: weight %s is not finite; resume "
                "from the last good checkpoint (%s)",
                bad,
                _last_good_checkpoint(trainer),
            )
            return
        step = state["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"][
            "total"
        ]["completed"]
        if path.is_file():
            try:
                existing = checkpoint_step(path)
            except (CheckpointError, FileNotFoundError) as error:
                logger.warning("CrashCheckpoint: replacing unreadable %s (%s)", path, error)
            else:
                if existing >= step:
                    logger.warning(
                        "CrashCheckpoint: kept %s (global step %d): it is not older than this "
                        "run's step %d",
                        path,
                        existing,
                        step,
                    )
                    return
        live: Any = trainer.fit_loop.epoch_loop.batch_progress.total  # has .processed
        if live.processed == live.completed + 1:
            # The failure came in on_train_batch_end, before Lightning logged the step's
            # metrics; the resume continues after this step, so log them now or never.
            _log_step_metrics(trainer)
        # The trainer is stopping: rewinding its counters only shapes what the file records
        # (and what the data module derives from them: the stream position).
        trainer.fit_loop.load_state_dict(state)
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(tmp)  # a collective; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, path)
            logger.warning(
                "%s at global step %d: wrote the crash checkpoint %s; resume with "
                "`--ckpt_path last` (CLI) or fit(ckpt_path=%r)",
                type(exception).__name__,
                step,
                path,
                str(path),
            )

    def _consistent_loop_state(self, trainer: pl.Trainer) -> tuple[dict[str, Any] | None, str]:
        """The fit loop's state at the last optimizer-step boundary, or None and why not."""
        live: Any = trainer.fit_loop.epoch_loop.batch_progress.total  # has .processed
        step = trainer.global_step
        if self._updating_from is not None and step == self._updating_from:
            return None, (
                f"the failure came while the optimizer was applying step {step + 1}, so the "
                "weights may be partly updated; resume from the last checkpoint "
                f"({_last_good_checkpoint(trainer)})"
            )
        if step != self._snapshot_step:
            # A step finished in this batch but on_train_batch_end did not reach this callback:
            # the live state is the on_train_batch_end layout, unless the failure came before it.
            if not live.ready == live.started == live.processed == live.completed + 1:
                return None, (
                    f"the failure came between optimizer step {step} and the end of its batch; "
                    f"resume from the last checkpoint ({_last_good_checkpoint(trainer)})"
                )
            state = trainer.fit_loop.state_dict()
        elif self._snapshot is None:
            return None, (
                f"no optimizer step since this run started or resumed at global step {step}, "
                "so the checkpoint it started from is still the latest"
            )
        else:
            state = copy.deepcopy(self._snapshot)
        boundary = state["epoch_loop.batch_progress"]["total"]["processed"]
        if self._val_started_at == boundary:
            pending = self._val_ended_at != boundary
        elif live.processed == boundary and live.completed == boundary - 1:
            pending = _validation_due(trainer)  # failed before this boundary's validation
        else:
            pending = False  # the boundary's validation ran, or was not due
        if pending:
            _mark_validation_pending(state)
        return state, ""


def _processed(trainer: pl.Trainer) -> int:
    total: Any = trainer.fit_loop.epoch_loop.batch_progress.total  # typed without .processed
    return int(total.processed)


def _log_step_metrics(trainer: pl.Trainer) -> None:
    """What the training loop does after on_train_batch_end: send the step's logged metrics."""
    try:
        trainer._logger_connector.update_train_step_metrics()
    except Exception as error:  # the failure may have come from a logger itself
        logger.debug("could not log the interrupted step's metrics: %s", error)


def _validation_due(trainer: pl.Trainer) -> bool:
    """Whether the epoch loop will validate after the current batch (Lightning's own rule)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None:
        return False
    try:
        return bool(epoch_loop._should_check_val_fx(fetcher))
    except Exception as error:  # a Lightning without this private rule: assume not due
        logger.debug("could not tell whether validation was due: %s", error)
        return False


def _mark_validation_pending(state: dict[str, Any]) -> None:
    """Rewrite an on_train_batch_end loop state as 'the boundary's validation has just begun'.

    Lightning restarts a validation that was interrupted mid-way (``RESTARTED_MID_EVALUATION``)
    and runs it from its first batch; an on_train_batch_end state would skip it instead. The
    batch counters become complete (``_batches_that_stepped`` is then incremented after the
    validation, as in an uninterrupted run) and the validation counters show one batch started.
    """
    batches = state["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        tracker = batches[part]
        tracker["ready"] = tracker["started"] = tracker["completed"] = tracker["processed"]
    val = state["epoch_loop.val_loop.batch_progress"]
    done = val["total"]["completed"]
    val["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    val["current"].update(ready=0, started=0, processed=0, completed=0)
    val["is_last_batch"] = False


# --------------------------------------------------------------------------------------------
# What `--ckpt_path last` resumes
# --------------------------------------------------------------------------------------------

_VERSION = re.compile(r"version_(\d+)$")


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The resumable checkpoints of one run directory: ``checkpoints/last*.ckpt`` and
    ``crash/*.ckpt`` (or, for a plain directory of checkpoints, its ``last*.ckpt`` and crash
    files), each a file or a sharded checkpoint directory."""
    run_dir = Path(run_dir)
    found = [
        *run_dir.glob(f"{CHECKPOINTS_DIRNAME}/last*.ckpt"),
        *run_dir.glob(f"{CRASH_DIRNAME}/*.ckpt"),
        *run_dir.glob("last*.ckpt"),
        *run_dir.glob("on_exception*.ckpt"),
    ]
    return sorted({p for p in found if p.is_file() or is_sharded_checkpoint(p)})


def find_resume_checkpoint(
    root: str | Path | None, extra_dirs: Iterable[str | Path] = ()
) -> tuple[Path, int] | None:
    """The checkpoint ``--ckpt_path last`` resumes: the latest run's most advanced one.

    The runs are ``root/version_N`` (a logger's run directories) and ``extra_dirs`` (explicit
    checkpoint directories). The latest run is the one whose newest resumable checkpoint was
    written last; in it, the checkpoint with the highest ``global_step`` wins (``last.ckpt``
    before a crash checkpoint of the same step, which may be mid-validation).

    Args:
        root: a logger's root directory (``save_dir/name``), or None.
        extra_dirs: more directories of checkpoints.

    Returns:
        ``(path, global_step)``, or None when there is no checkpoint.

    Raises:
        CheckpointError: a candidate of the latest run is unsafe or unreadable (the message
            names it).
    """
    runs: list[tuple[float, list[Path]]] = []
    dirs: list[Path] = [Path(d) for d in extra_dirs]
    if root is not None and Path(root).is_dir():
        dirs += [d for d in Path(root).iterdir() if d.is_dir() and _VERSION.search(d.name)]
    for run_dir in dirs:
        files = run_checkpoints(run_dir)
        if files:
            runs.append((max(_checkpoint_mtime(f) for f in files), files))
    if not runs:
        return None
    _, files = max(runs, key=lambda run: run[0])
    ranked = [(checkpoint_step(f), CRASH_DIRNAME not in f.parent.name, f) for f in files]
    step, _, best = max(ranked, key=lambda r: (r[0], r[1], _checkpoint_mtime(r[2])))
    return best, step


def run_version(path: str | Path, root: str | Path) -> int | None:
    """N if ``path`` lies in ``root/version_N/``, else None."""
    try:
        relative = Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    match = _VERSION.search(relative.parts[0]) if relative.parts else None
    return int(match.group(1)) if match else None
