"""The ``slope-lightning`` command: one command tree over SLoPeModule and TextDataModule.

    slope-lightning fit --config configs/tiny.yaml                     # a new run
    slope-lightning fit --config configs/tiny.yaml --ckpt_path last    # resume the latest run
    slope-lightning validate --config configs/tiny.yaml --ckpt_path last
    slope-lightning test --config configs/tiny.yaml --data.test_fraction 0.05 --ckpt_path last
    slope-lightning study --config configs/studies/tiny.yaml           # a quality study
    slope-lightning generate runs/tiny/version_0/export --prompt "To be"  # sample text
    slope-lightning bench layers                                       # a benchmark suite
    slope-lightning fetch smollm2-135m                                 # a pretrained model

Subcommands (:data:`SUBCOMMANDS`; ``slope-lightning --help`` lists them, each has ``--help``):
``fit``, ``validate`` and ``test`` (LightningCLI; ``test`` evaluates on the held-out test
split, ``data.test_fraction``, which nothing in ``fit`` reads), ``study``
(:mod:`slope_lightning.study`), ``generate`` (:mod:`slope_lightning.generate`), ``bench``
(:mod:`slope_lightning.bench`) and ``fetch`` (:mod:`slope_lightning.models.pretrained`).
Lightning's ``predict`` is left out on purpose: the data module has no prompt source, so it
could only fail after building the model. An unknown subcommand fails at once, listing them.

Runs and resuming:

* A plain ``fit`` is always a new run in its own ``<save_dir>/<name>/version_N``, reserved
  before anything else happens (:mod:`slope_lightning.cli_runs`). It never resumes by itself
  and never writes beside another run's checkpoints.
* ``validate`` and ``test`` build the model the checkpoint was trained as; a model setting
  given explicitly (on the command line or in a config) that differs from the checkpoint's is
  an error, never silently replaced.
* ``--ckpt_path last`` resumes the most recently written run from its most advanced
  checkpoint (``last.ckpt`` or its crash checkpoint), in that run's directory, and logs which
  file and step. ``--ckpt_path FILE`` resumes from a file. Either is checked before anything
  is built: loaded with ``weights_only=True`` (never unpickling code), and its step read.
* Every checkpoint load of the Trainer goes through
  :class:`~slope_lightning.checkpoints.SafeCheckpointIO`
  (``weights_only=True`` explicitly, whatever torch's default).

Exit status: 0 on success, 2 for a bad command line or config, 1 for a failure, 130 when
interrupted; a failure a user can fix prints one ``error: ...`` line
(:mod:`slope_lightning.cli_errors`). ``SLOPE_LIGHTNING_DEBUG=1`` shows every traceback.

The command is split by job: this module (the LightningCLI subclass, :func:`main` and the
dispatch to subcommands), :mod:`~slope_lightning.cli_commands` (the command tree and its help),
:mod:`~slope_lightning.cli_checks` (checks on the parsed config),
:mod:`~slope_lightning.cli_runs` (run directories) and :mod:`~slope_lightning.cli_errors`
(failures as one line and an exit status).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from slope_lightning.checkpoints import SafeCheckpointIO, resume_point, written_crash_checkpoint
from slope_lightning.cli_checks import check_parsed_config, check_test_split_unseen
from slope_lightning.cli_commands import SUBCOMMANDS, check_subcommand, top_level_help
from slope_lightning.cli_errors import (
    DEBUG_ENV,
    ConfigError,
    TrainingInterrupted,
    describe_failure,
    instantiation_message,
    print_error,
)
from slope_lightning.cli_runs import (
    continue_in_version,
    explicit_checkpoint_dirs,
    logger_root,
    refuse_used_checkpoint_dirs,
    release_if_empty,
    reserve_run_version,
)
from slope_lightning.data import TextDataModule
from slope_lightning.generate import generate_command
from slope_lightning.module import SLoPeModule
from slope_lightning.sparse.selection import NothingSparsifiedError
from slope_lightning.study import study_command

__all__ = [
    "SUBCOMMANDS",
    "ConfigError",
    "SLoPeCLI",
    "TrainingInterrupted",
    "main",
    "run_cli",
    "top_level_help",
]

logger = logging.getLogger(__name__)

# Trainer.fit/validate take weights_only since Lightning 2.6; SafeCheckpointIO enforces it
# either way, this says it at the call too.
_WEIGHTS_ONLY = (
    {"weights_only": True} if "weights_only" in inspect.signature(pl.Trainer.fit).parameters else {}
)


class SLoPeCLI(LightningCLI):
    """LightningCLI with the values the model and the data share linked once, explicit
    resuming, safe checkpoint loading, and errors that name the key and the fix.

    Raises:
        ConfigError: a conflicting or unusable setting (the message names the keys).
        CheckpointError: ``--ckpt_path`` names an unsafe or unreadable file.
        FileNotFoundError: ``--ckpt_path`` names a missing file.
        TrainingInterrupted: ``fit`` was interrupted.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``; why not ``predict``: see the module docstring."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "test": {"model", "dataloaders", "datamodule"},
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The run directory this process reserved, removed again if the command fails
        # before anything was written into it.
        self.reserved_run_dir: Path | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._release_reserved_run_dir()
            raise

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Raise parse errors (main() prints them as one line) instead of printing the usage.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        # The tokenizer decides the vocabulary; known when the data module exists.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check what only the combination of values can tell, resolve
        ``--ckpt_path`` to a checked file (before Lightning reads hyperparameters from it),
        and reserve a new run's directory.

        Parses as LightningCLI does, without its warning about ``args`` beside ``sys.argv``:
        :func:`main` passes ``args`` on purpose (a study runs its fits in-process).
        """
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        check_parsed_config(subcommand, config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:  # a new fit
            refuse_used_checkpoint_dirs(config)
            self.reserved_run_dir = reserve_run_version(config)
            return
        root = logger_root(config)
        # FileNotFoundError / CheckpointError for a bad file, by name
        found = resume_point(ckpt_path, root, explicit_checkpoint_dirs(config))
        if found is None:
            where = f"{root}/version_*/" if root is not None else "the checkpoint dirpaths"
            raise ConfigError(
                f"--ckpt_path last: no checkpoint to resume under {where} (checkpoints/"
                "last.ckpt or crash/*.ckpt); run without --ckpt_path to start a new run, "
                "or pass a checkpoint file"
            )
        path, step, version = found.path, found.step, found.version
        config.ckpt_path = str(path)
        if subcommand == "test":
            check_test_split_unseen(path, config)
        if subcommand == "fit" and version is not None:
            continue_in_version(config, version)
        else:  # validate / test log into a new version of their own
            self.reserved_run_dir = reserve_run_version(config)
        logger.info(
            "%s: %s from %s (global step %d)%s",
            subcommand,
            "resuming" if subcommand == "fit" else "evaluating the weights",
            path,
            step,
            f", logging to version_{version}"
            if subcommand == "fit" and version is not None
            else "",
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning's reading of the model settings from ``--ckpt_path``, refusing a setting
        given explicitly that the checkpoint's would replace (Lightning drops it silently).

        Raises:
            ConfigError: a model setting differs from the checkpoint's (the message names it).
        """
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return super()._parse_ckpt_path()
        before = self.config[subcommand].get("model")
        before = before.clone() if isinstance(before, Namespace) else before
        super()._parse_ckpt_path()
        after = self.config[subcommand].get("model")
        if not isinstance(before, Namespace) or not isinstance(after, Namespace):
            return
        defaults = self.parser.get_defaults().get(f"{subcommand}.model")
        changed = [
            key
            for key in sorted(before.keys())
            if key not in ("seq_len", "vocab_size")  # linked from data.*, checked there
            and before.get(key) != after.get(key)
            and (not isinstance(defaults, Namespace) or before.get(key) != defaults.get(key))
        ]
        if changed:
            details = "; ".join(
                f"model.{key}={before.get(key)!r} but the checkpoint has {after.get(key)!r}"
                for key in changed
            )
            raise ConfigError(
                f"{subcommand} --ckpt_path {self.config[subcommand].get('ckpt_path')}: {details}. "
                "The checkpoint's model is what gets evaluated: drop these settings (or make "
                "them the checkpoint's), or train a run with them"
            )

    def instantiate_classes(self) -> None:
        """Build the model, data module, Trainer and callbacks; a value their constructors
        reject is a config error (exit 2) in their own words, naming the key.

        Raises:
            ConfigError: a constructor rejected a configured value.
        """
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as error:
            if isinstance(error, NothingSparsifiedError):
                raise
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            raise ConfigError(instantiation_message(error, config)) from error

    def _release_reserved_run_dir(self) -> None:
        """Remove the reserved run directory if nothing was written into it."""
        if release_if_empty(self.reserved_run_dir):
            self.reserved_run_dir = None

    def after_instantiate_classes(self) -> None:
        """Install the safe checkpoint reader."""
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = SafeCheckpointIO()
        elif not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
            logger.warning(
                "checkpoint IO %s is not SafeCheckpointIO: checkpoints load with its own "
                "weights_only policy",
                type(strategy.checkpoint_io).__name__,
            )

    def fit(
        self,
        model: SLoPeModule,
        datamodule: TextDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """``trainer.fit`` with ``weights_only=True``; Ctrl-C becomes :class:`TrainingInterrupted`.

        Raises:
            TrainingInterrupted: the run was interrupted (Lightning exits on Ctrl-C).
        """
        try:
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **_WEIGHTS_ONLY)
        except SystemExit:
            if not self.trainer.interrupted:
                raise
            raise TrainingInterrupted(
                f"interrupted at global step {self.trainer.global_step}; "
                f"{_crash_checkpoint_note(self.trainer)}; resume with --ckpt_path last"
            ) from None

    # validate and test get the Trainer method's keyword arguments from the config
    # (datamodule, ckpt_path, verbose, weights_only); they only make weights_only True.

    def validate(self, model: SLoPeModule, **kwargs: Any) -> None:
        """``trainer.validate`` on the checked checkpoint, with ``weights_only=True``."""
        self.trainer.validate(model, **{**kwargs, **_WEIGHTS_ONLY})

    def test(self, model: SLoPeModule, **kwargs: Any) -> None:
        """``trainer.test`` on the checked checkpoint and the held-out test split, with
        ``weights_only=True``; logs ``test/loss`` and ``test/ppl``."""
        self.trainer.test(model, **{**kwargs, **_WEIGHTS_ONLY})


def _crash_checkpoint_note(trainer: Any) -> str:
    path = written_crash_checkpoint(trainer.callbacks)
    return (
        f"crash checkpoint: {path}"
        if path
        else "no crash checkpoint was written (see the log above)"
    )


def run_cli(args: list[str] | None = None) -> SLoPeCLI:
    """Build and run the CLI in-process (tests, notebooks); errors propagate as exceptions.

    Args:
        args: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        The finished :class:`SLoPeCLI` (``.trainer``, ``.model``, ``.datamodule``).

    Raises:
        jsonargparse.ArgumentError: a bad command line or config value.
        ConfigError, CheckpointError, FileNotFoundError, NonFiniteError,
        TrainingInterrupted: see :class:`SLoPeCLI` and :mod:`slope_lightning.checkpoints`.
        SystemExit: ``--help`` and ``--print_config`` (status 0).
    """
    return SLoPeCLI(
        SLoPeModule,
        TextDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "slope"},
            }
        },
        args=args,
    )


def main(args: list[str] | None = None) -> int:
    """Entry point of the console script: runs one subcommand and returns the exit status.

    Args:
        args: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        0 on success (and for ``--help``), 2 for a bad command line or config, 1 for a failure,
        130 when interrupted.

    Raises:
        Exception: any failure that is not a user error (a bug) propagates with its
            traceback; with ``SLOPE_LIGHTNING_DEBUG=1`` every failure does.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else ""
    # Lightning's launcher starts the other ranks as copies of this command: only rank 0
    # prints the error line (the ranks fail alike; SLOPE_LIGHTNING_DEBUG=1 shows every rank's).
    report = rank_zero_only.rank == 0  # type: ignore[attr-defined]
    try:
        return _run_subcommand(argv)
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print_error(str(code), report)
        return 1
    except BaseException as error:
        failure = describe_failure(error, command)
        if failure is None or debug:
            raise  # a bug (or SLOPE_LIGHTNING_DEBUG=1): the traceback
        status, message = failure
        print_error(message, report)
        return status


def _run_subcommand(argv: list[str]) -> int:
    """Dispatch ``argv`` (without the program name) to its subcommand; returns its status."""
    if argv and argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0
    command, rest = check_subcommand(argv), argv[1:]
    if command == "study":
        # not a LightningCLI subcommand: it runs many fits (in-process ones through main)
        return study_command(rest, fit_main=main)
    if command == "generate":
        # not a LightningCLI subcommand either: it loads a model and prints text
        return generate_command(rest)
    if command == "bench":
        from slope_lightning.bench.__main__ import main as bench_main

        bench_main(rest)
        return 0
    if command == "fetch":
        from slope_lightning.models.pretrained import main as fetch_main

        return fetch_main(rest)
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
