"""Every use of Lightning's private or undocumented internals by the callbacks, in one place.

Lightning offers no public API for these; each function says why it is needed. A Lightning
upgrade that moves one of them fails ``tests/test_lightning_internals.py`` with a message
naming the attribute (:func:`missing_internals`), instead of failing a run late (a crash
checkpoint that logs a step twice, a resume that loses the adapters' optimizer state).
Written against Lightning 2.6.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import lightning.pytorch as pl

logger = logging.getLogger(__name__)


def processed_batches(trainer: pl.Trainer) -> int:
    """Training batches whose step has run (``batch_progress.total.processed``).

    Why: CrashCheckpoint tells where in a batch a failure came from the loop's progress
    counters; ``processed`` is not in the progress tracker's declared type.
    """
    total: Any = trainer.fit_loop.epoch_loop.batch_progress.total
    return int(total.processed)


def batch_progress(trainer: pl.Trainer) -> Any:
    """The fit loop's running batch counters (``ready``, ``started``, ``processed``,
    ``completed``), typed loosely: ``processed`` is not declared on the tracker's type."""
    return trainer.fit_loop.epoch_loop.batch_progress.total


def send_step_metrics(trainer: pl.Trainer) -> None:
    """What the training loop does after ``on_train_batch_end``: send the step's logged
    metrics to the loggers.

    Why: a failure in ``on_train_batch_end`` comes before Lightning logs the step; the crash
    checkpoint resumes after that step, so its metrics are sent now or never. Lightning keeps
    this in the private ``trainer._logger_connector``; a failure here is only logged.
    """
    try:
        trainer._logger_connector.update_train_step_metrics()
    except Exception as error:  # the failure may have come from a logger itself
        logger.debug("could not log the interrupted step's metrics: %s", error)


def validation_due(trainer: pl.Trainer) -> bool:
    """Whether the epoch loop will validate after the current batch (Lightning's own rule,
    ``epoch_loop._should_check_val_fx``, with the private ``fit_loop._data_fetcher``).

    Why: a crash checkpoint written between a step and its validation must mark that
    validation as pending, so a resume validates at the same step as an uninterrupted run.
    A Lightning without this rule: assumed not due (and logged at debug level).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None:
        return False
    try:
        return bool(epoch_loop._should_check_val_fx(fetcher))
    except Exception as error:
        logger.debug("could not tell whether validation was due: %s", error)
        return False


def optimizer_steps_of(loop_state: dict[str, Any]) -> int:
    """The optimizer steps completed, read from a fit loop's ``state_dict()``.

    Why: CrashCheckpoint saves a rewound loop state and names its step; the layout of the
    loop state is Lightning's, not documented.
    """
    progress = loop_state["epoch_loop.automatic_optimization.optim_progress"]
    return int(progress["optimizer"]["step"]["total"]["completed"])


def boundary_of(loop_state: dict[str, Any]) -> int:
    """The processed training batches recorded in a fit loop's ``state_dict()``."""
    return int(loop_state["epoch_loop.batch_progress"]["total"]["processed"])


def mark_validation_pending(loop_state: dict[str, Any]) -> None:
    """Rewrite an on_train_batch_end loop state as 'the boundary's validation has just begun'.

    Lightning restarts a validation that was interrupted mid-way (``RESTARTED_MID_EVALUATION``)
    and runs it from its first batch; an on_train_batch_end state would skip it instead. The
    batch counters become complete (``_batches_that_stepped`` is then incremented after the
    validation, as in an uninterrupted run) and the validation counters show one batch started.

    Why here: it writes the undocumented layout of Lightning's loop state.
    """
    batches = loop_state["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        tracker = batches[part]
        tracker["ready"] = tracker["started"] = tracker["completed"] = tracker["processed"]
    val = loop_state["epoch_loop.val_loop.batch_progress"]
    done = val["total"]["completed"]
    val["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    val["current"].update(ready=0, started=0, processed=0, completed=0)
    val["is_last_batch"] = False


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """Run ``configure_optimizers`` again and install the result (``strategy.setup_optimizers``).

    Why: the SLoPe callback converts a module that builds its layers in ``configure_model``
    at ``on_fit_start``, after Lightning built the optimizer over the dense weights and
    before any step. ``Strategy.setup_optimizers`` is a public method, but calling it from a
    callback mid-fit is not a documented use.
    """
    trainer.strategy.setup_optimizers(trainer)


def reload_checkpoint(trainer: pl.Trainer) -> None:
    """Load the checkpoint the fit resumed from again, optimizer state included, from a
    training-batch hook (a collective under a distributed strategy: every rank calls it).

    Why: a strategy that restores a checkpoint after ``on_fit_start`` (ModelParallelStrategy,
    i.e. FSDP2) loaded it before LazyLoRA re-created the adapters and their param group, so
    their entries were skipped. The optimizer's state is cleared first (the load rebuilds it
    for every parameter), then ``strategy.load_checkpoint`` reads ``trainer.ckpt_path``
    into the model and optimizers as Lightning's restore does.
    """
    trainer.optimizers[0].state.clear()
    trainer.strategy.load_checkpoint(trainer.ckpt_path)  # type: ignore[arg-type]


def missing_internals(trainer: pl.Trainer) -> list[str]:
    """What this module uses that ``trainer``'s Lightning no longer provides, one line each
    (empty when everything is there). Call it on a trainer that has started fitting."""
    problems: list[str] = []
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    connector = getattr(trainer, "_logger_connector", None)
    if not callable(getattr(connector, "update_train_step_metrics", None)):
        problems.append("trainer._logger_connector.update_train_step_metrics() is gone")
    if not hasattr(fit_loop, "_data_fetcher"):
        problems.append("trainer.fit_loop._data_fetcher is gone")
    check = getattr(epoch_loop, "_should_check_val_fx", None)
    if not callable(check) or len(inspect.signature(check).parameters) != 1:
        problems.append("trainer.fit_loop.epoch_loop._should_check_val_fx(data_fetcher) changed")
    if not hasattr(batch_progress(trainer), "processed"):
        problems.append("fit_loop.epoch_loop.batch_progress.total.processed is gone")
    state = fit_loop.state_dict()
    for key in (
        "epoch_loop.batch_progress",
        "epoch_loop.val_loop.batch_progress",
        "epoch_loop.automatic_optimization.optim_progress",
    ):
        if key not in state:
            problems.append(f"the fit loop's state_dict() has no {key!r}")
    for name, expected in (("setup_optimizers", ["trainer"]), ("load_checkpoint", None)):
        method = getattr(trainer.strategy, name, None)
        if not callable(method):
            problems.append(f"Strategy.{name} is gone")
        elif expected is not None and list(inspect.signature(method).parameters) != expected:
            problems.append(f"Strategy.{name} no longer takes ({', '.join(expected)})")
    return problems
