"""The ``slope-lightning`` command: LightningCLI over SLoPeModule and TextDataModule.

    slope-lightning fit --config configs/tiny.yaml                     # a new run
    slope-lightning fit --config configs/tiny.yaml --ckpt_path last    # resume the latest run
    slope-lightning validate --config configs/tiny.yaml --ckpt_path last
    slope-lightning study --config configs/studies/tiny.yaml           # a quality study
    slope-lightning generate runs/tiny/version_0/export --prompt "To be"  # sample text

Subcommands: ``fit`` and ``validate`` (LightningCLI), ``study``
(:mod:`slope_lightning.study`: methods × learning rates × seeds, each run a ``fit``, then
one report; it has its own options, ``slope-lightning study --help``) and ``generate``
(:mod:`slope_lightning.generate`: text from a checkpoint or an export,
``slope-lightning generate --help``). Lightning's ``test``
and ``predict`` are left out on purpose: the data module has no test split distinct from the
validation split (``validate`` on a checkpoint is the held-out evaluation) and no prompt
source for generation, so both could only fail after building the model. An unknown
subcommand fails at once, listing the two LightningCLI ones.

Runs and resuming:

* A plain ``fit`` is always a new run in a new ``<save_dir>/<name>/version_N`` directory,
  which holds everything of that run: TensorBoard events, ``config.yaml``,
  ``checkpoints/`` (``last.ckpt`` and the best), ``crash/`` and ``export/``. It never resumes
  by itself and never writes beside another run's checkpoints.
* ``--ckpt_path last`` resumes the most recently written run from its most advanced
  checkpoint (``last.ckpt`` or its crash checkpoint), in that run's directory, and logs which
  file and step. ``--ckpt_path FILE`` resumes from a file. Either is checked before anything
  is built: loaded with ``weights_only=True`` (never unpickling code), and its step read.
* Every checkpoint load of the Trainer goes through
  :class:`~slope_lightning.checkpoints.SafeCheckpointIO`
  (``weights_only=True`` explicitly, whatever torch's default).

Exit status: 0 on success; 2 for a bad command line or config; 1 for a failure (a missing or
corrupt file, a non-finite loss, a full disk, ...); 130 when interrupted. Failures a user can
fix print one ``error: ...`` line on stderr and no traceback; anything else is a bug and
keeps its traceback. ``SLOPE_LIGHTNING_DEBUG=1`` shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from slope_lightning.callbacks import NonFiniteError
from slope_lightning.checkpoints import (
    CheckpointError,
    SafeCheckpointIO,
    earlier_checkpoint_in,
    resume_point,
    runs_root,
    written_crash_checkpoint,
)
from slope_lightning.data import TextDataModule
from slope_lightning.data.artifacts import CorruptCacheError
from slope_lightning.generate import GenerateUsageError, generate_command
from slope_lightning.module import SLoPeModule
from slope_lightning.sparse.sparsify import NothingSparsifiedError
from slope_lightning.study import StudyConfigError, StudyIncomplete, study_command

logger = logging.getLogger(__name__)

#: Environment variable: set to 1 to see the traceback of every failure.
DEBUG_ENV = "SLOPE_LIGHTNING_DEBUG"

#: Model hyperparameters the CLI links from the data module; never set them twice.
LINKED_KEYS = ("seq_len", "vocab_size")

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Trainer.fit/validate take weights_only since Lightning 2.6; SafeCheckpointIO enforces it
# either way, this says it at the call too.
_WEIGHTS_ONLY = (
    {"weights_only": True} if "weights_only" in inspect.signature(pl.Trainer.fit).parameters else {}
)


class ConfigError(ValueError):
    """A command line or config that cannot work, found before anything is built."""


class TrainingInterrupted(RuntimeError):
    """``fit`` was interrupted (Ctrl-C); the message says where its state was saved."""


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
        """``fit`` and ``validate``; why not ``test`` / ``predict``: see the module docstring."""
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Raise parse errors (main() prints them as one line) instead of printing the usage.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        # The tokenizer decides the vocabulary; known when the data module exists.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check what only the combination of values can tell, and resolve
        ``--ckpt_path`` to a checked file (before Lightning reads hyperparameters from it)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        _check_linked_overrides(config)
        _refuse_auto_resuming_callbacks(config)
        if config.get("weights_only") is False:
            raise ConfigError(
                "--weights_only false is refused: slope-lightning loads checkpoints with "
                "weights_only=True only (tensors and plain containers, never code); drop it"
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            if subcommand == "validate":
                raise ConfigError(
                    "validate needs the weights to evaluate: pass --ckpt_path FILE, or "
                    "--ckpt_path last for the latest run's checkpoint"
                )
            _refuse_used_checkpoint_dirs(config)
            return
        root = _logger_root(config)
        # FileNotFoundError / CheckpointError for a bad file, by name
        found = resume_point(ckpt_path, root, _explicit_checkpoint_dirs(config))
        if found is None:
            where = f"{root}/version_*/" if root is not None else "the checkpoint dirpaths"
            raise ConfigError(
                f"--ckpt_path last: no checkpoint to resume under {where} (checkpoints/"
                "last.ckpt or crash/*.ckpt); run without --ckpt_path to start a new run, "
                "or pass a checkpoint file"
            )
        path, step, version = found.path, found.step, found.version
        config.ckpt_path = str(path)
        if subcommand == "fit" and version is not None:
            _continue_in_version(config, version)
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

    def validate(
        self,
        model: SLoPeModule,
        datamodule: TextDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        verbose: bool = True,
    ) -> None:
        """``trainer.validate`` on the checked checkpoint, with ``weights_only=True``."""
        self.trainer.validate(
            model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=verbose, **_WEIGHTS_ONLY
        )


# --------------------------------------------------------------------------------------------
# Checks on the parsed config
# --------------------------------------------------------------------------------------------


def _check_linked_overrides(config: Namespace) -> None:
    """``model_overrides`` must not set what the data module decides (LINKED_KEYS)."""
    overrides = config.get("model.model_overrides") or {}
    if not isinstance(overrides, dict):
        return  # SLoPeModule reports a wrong type itself
    for key in LINKED_KEYS:
        if key not in overrides:
            continue
        data_value = config.get(f"data.{key}")
        if key == "vocab_size" and config.get("data.tokenizer_path") is not None:
            raise ConfigError(
                f"model.model_overrides.{key}={overrides[key]} conflicts with "
                f"data.tokenizer_path={config.get('data.tokenizer_path')}, whose vocabulary "
                f"size the model takes; drop {key} from model_overrides"
            )
        if overrides[key] != data_value:
            raise ConfigError(
                f"model.model_overrides.{key}={overrides[key]} conflicts with "
                f"data.{key}={data_value}, which the CLI links to the model; set data.{key} "
                f"instead and drop {key} from model_overrides"
            )


def _logger_root(config: Namespace) -> Path | None:
    """``save_dir/name`` of a TensorBoard/CSV logger in the config (its version dirs' parent)."""
    logger_config = config.get("trainer.logger")
    if isinstance(logger_config, list):
        logger_config = logger_config[0] if logger_config else None
    if not isinstance(logger_config, Namespace):
        return None
    init = logger_config.get("init_args") or Namespace()
    return runs_root(init.get("save_dir") or init.get("root_dir"), init.get("name"))


def _continue_in_version(config: Namespace, version: int) -> None:
    """Log a resumed run into the directory of the run it resumes (unless a version is set)."""
    logger_config = config.get("trainer.logger")
    if isinstance(logger_config, list):
        logger_config = logger_config[0] if logger_config else None
    init = logger_config.get("init_args") if isinstance(logger_config, Namespace) else None
    if init is not None and init.get("version") is None:
        init.version = version


def _callback_configs(config: Namespace) -> list[tuple[type, Namespace]]:
    """(class, init_args) of every class_path callback in the trainer config."""
    found = []
    for callback in config.get("trainer.callbacks") or []:
        if not isinstance(callback, Namespace) or not callback.get("class_path"):
            continue
        module_name, _, class_name = callback.class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # the parser has accepted it; nothing of ours to check
        found.append((cls, callback.get("init_args") or Namespace()))
    return found


def _explicit_checkpoint_dirs(config: Namespace) -> list[Path]:
    return [
        Path(init.dirpath)
        for cls, init in _callback_configs(config)
        if isinstance(cls, type) and issubclass(cls, Checkpoint) and init.get("dirpath")
    ]


def _refuse_auto_resuming_callbacks(config: Namespace) -> None:
    """Lightning resumes every ``fit(ckpt_path=None)`` when an OnExceptionCheckpoint is set."""
    for cls, _ in _callback_configs(config):
        if isinstance(cls, type) and issubclass(cls, OnExceptionCheckpoint):
            raise ConfigError(
                f"trainer.callbacks: {cls.__name__} makes Lightning resume every fit from the "
                "last checkpoint it finds, by itself; use "
                "slope_lightning.callbacks.CrashCheckpoint instead (the same crash checkpoint; "
                "resuming stays explicit with --ckpt_path)"
            )


def _refuse_used_checkpoint_dirs(config: Namespace) -> None:
    """A new run must not write its checkpoints beside another run's."""
    used = earlier_checkpoint_in(_explicit_checkpoint_dirs(config))
    if used is not None:
        directory, existing = used
        raise ConfigError(
            f"a checkpoint callback's dirpath {str(directory)!r} already holds checkpoints "
            f"of an earlier run ({existing.name}); a new run would write beside them. "
            "Remove dirpath from the config (each run then keeps its checkpoints in its "
            "own version directory), point it at an empty directory, or resume with "
            "--ckpt_path last"
        )


def _crash_checkpoint_note(trainer: Any) -> str:
    path = written_crash_checkpoint(trainer.callbacks)
    return (
        f"crash checkpoint: {path}"
        if path
        else "no crash checkpoint was written (see the log above)"
    )


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


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


# Failures a user can fix from the message alone: printed as one line, no traceback.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (
    argparse.ArgumentError,
    ConfigError,
    GenerateUsageError,
    NothingSparsifiedError,
    StudyConfigError,
)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    CheckpointError,
    CorruptCacheError,
    NonFiniteError,
    MisconfigurationException,
    StudyIncomplete,
    _OOM,
)


def main(args: list[str] | None = None) -> int:
    """Entry point of the console script: runs the CLI and returns the exit status.

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
    args = sys.argv[1:] if args is None else list(args)
    try:
        if args[:1] == ["study"]:
            # not a LightningCLI subcommand: it runs many fits (in-process ones through main)
            return study_command(args[1:], fit_main=main)
        if args[:1] == ["generate"]:
            # not a LightningCLI subcommand either: it loads a model and prints text
            return generate_command(args[1:])
        run_cli(args)
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(f"error: {code}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, TrainingInterrupted) as error:
        if debug:
            raise
        detail = str(error) or "interrupted; resume with --ckpt_path last"
        print(f"error: {_one_line(detail)}", file=sys.stderr)
        return 130
    except _USAGE_ERRORS as error:
        if debug:
            raise
        print(f"error: {_format_parse_error(error)}", file=sys.stderr)
        return 2
    except _USER_ERRORS as error:
        if debug:
            raise
        kind = "" if isinstance(error, (ValueError, RuntimeError)) else f"{type(error).__name__}: "
        message = _format_parse_error(error) if isinstance(error, ValueError) else str(error)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            message += (
                "; free disk space (checkpoints and exports are written atomically, so the "
                "previous ones are intact), then resume with --ckpt_path last"
            )
        print(
            f"error: {kind}{_one_line(message)}  [{DEBUG_ENV}=1 shows the traceback]",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


_LINK_TARGET = re.compile(r"argument (\S+) --> (\S+):")
_PARSER_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
    "- Problem with given class_path",
)


def _format_parse_error(error: BaseException) -> str:
    """One line from jsonargparse's nested message: the full key and the innermost reason.

    jsonargparse reports a value that fails a nested class (a dataclass whose
    ``__post_init__`` raises, a Literal, an unknown key) as a tree of "Parser key" lines,
    union alternatives and the given value; the key path and the innermost reason are what a
    user needs. Messages of another shape are kept as they are. An unknown option gets a
    pointer to ``--help``.
    """
    text = str(error)
    summary = text
    if not isinstance(error, ConfigError) and (
        "Parser key" in text or "Does not validate against any of the" in text
    ):
        keys: list[str] = []
        detail = ""
        for raw in text.splitlines():
            line = raw.strip()
            match = _PARSER_KEY.match(line)
            if match:
                if not keys or not match.group(1).startswith(keys[-1]):
                    keys.append(match.group(1))
                detail = match.group(2) or detail
            elif line and not line.startswith(_NOISE):
                detail = line.lstrip("- ")
        if detail:
            summary = f"{'.'.join(keys)}: {detail}" if keys else detail
    link = _LINK_TARGET.search(summary)
    if link:  # jsonargparse: "argument data.seq_len --> model.seq_len: ... is not callable"
        source, target = link.groups()
        summary = (
            f"{target} is set from {source} by the CLI (a linked value): set {source} "
            f"instead and drop {target}"
        )
    if "unrecognized arguments" in summary or "is not accepted" in summary:
        summary += " (--help lists the accepted options)"
    return _one_line(summary)


if __name__ == "__main__":
    sys.exit(main())
