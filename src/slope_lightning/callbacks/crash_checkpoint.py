"""CrashCheckpoint: a checkpoint when training dies (an exception or Ctrl-C), written only
for a failure *during* training, never over a newer one, never from non-finite weights, and
rewound to the last optimizer-step boundary so that a resume logs the same steps and
validates at the same steps as an uninterrupted run.

Why CrashCheckpoint does not subclass Lightning's ``OnExceptionCheckpoint``: Lightning
(2.6, ``_CheckpointConnector._parse_ckpt_path``) turns ``fit(ckpt_path=None)`` into
``ckpt_path="last"`` whenever an ``OnExceptionCheckpoint`` instance is among the callbacks, so
every plain ``fit`` silently resumed from whatever checkpoint it found. A plain
:class:`~lightning.pytorch.callbacks.Checkpoint` subclass keeps ``fit`` a fresh start.

The loop-state internals it reads and rewrites live in
:mod:`slope_lightning.callbacks.lightning_internals`.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from slope_lightning.callbacks.lightning_internals import (
    batch_progress,
    boundary_of,
    mark_validation_pending,
    optimizer_steps_of,
    processed_batches,
    send_step_metrics,
    validation_due,
)
from slope_lightning.callbacks.shared import last_good_checkpoint, non_finite_weights
from slope_lightning.checkpoints import CRASH_DIRNAME, CheckpointError, checkpoint_step
from slope_lightning.utils import first_line

logger = logging.getLogger(__name__)


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
            self._val_started_at = processed_batches(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last hook before Lightning sends the validation metrics to the loggers (there is
        # none after it and before on_validation_end, whose other callbacks, e.g. a
        # ModelCheckpoint save on a full disk, may fail after the metrics were logged). Seen
        # as finished from here, an interrupted validation is never logged twice.
        if self._training and not trainer.sanity_checking:
            self._val_ended_at = processed_batches(trainer)

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
                first_line(error),
            )

    def _save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        path = Path(self.ckpt_path)
        state, reason = self._consistent_loop_state(trainer)
        if state is None:
            logger.warning("CrashCheckpoint: no crash checkpoint written: %s", reason)
            return
        bad = non_finite_weights(pl_module)
        if bad is not None:
            logger.warning(
                "CrashCheckpoint: no crash checkpoint written: weight %s is not finite; resume "
                "from the last good checkpoint (%s)",
                bad,
                last_good_checkpoint(trainer),
            )
            return
        step = optimizer_steps_of(state)
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
        live = batch_progress(trainer)
        if live.processed == live.completed + 1:
            # The failure came in on_train_batch_end, before Lightning logged the step's
            # metrics; the resume continues after this step, so log them now or never.
            send_step_metrics(trainer)
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
        live = batch_progress(trainer)
        step = trainer.global_step
        if self._updating_from is not None and step == self._updating_from:
            return None, (
                f"the failure came while the optimizer was applying step {step + 1}, so the "
                "weights may be partly updated; resume from the last checkpoint "
                f"({last_good_checkpoint(trainer)})"
            )
        if step != self._snapshot_step:
            # A step finished in this batch but on_train_batch_end did not reach this callback:
            # the live state is the on_train_batch_end layout, unless the failure came before it.
            if not live.ready == live.started == live.processed == live.completed + 1:
                return None, (
                    f"the failure came between optimizer step {step} and the end of its batch; "
                    f"resume from the last checkpoint ({last_good_checkpoint(trainer)})"
                )
            state = trainer.fit_loop.state_dict()
        elif self._snapshot is None:
            return None, (
                f"no optimizer step since this run started or resumed at global step {step}, "
                "so the checkpoint it started from is still the latest"
            )
        else:
            state = copy.deepcopy(self._snapshot)
        boundary = boundary_of(state)
        if self._val_started_at == boundary:
            pending = self._val_ended_at != boundary
        elif live.processed == boundary and live.completed == boundary - 1:
            pending = validation_due(trainer)  # failed before this boundary's validation
        else:
            pending = False  # the boundary's validation ran, or was not due
        if pending:
            mark_validation_pending(state)
        return state, ""
