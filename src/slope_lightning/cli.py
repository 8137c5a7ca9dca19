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

* A plain ``fit`` is always a new run in a new ``<save_dir>/<name>/version_N`` directory,
  which holds everything of that run: TensorBoard events, ``config.yaml``,
  ``checkpoints/`` (``last.ckpt`` and the best), ``crash/`` and ``export/``. It never resumes
  by itself and never writes beside another run's checkpoints. The directory is reserved
  before anything else happens (``os.mkdir`` of ``version_N`` succeeding is the reservation;
  N + 1 is tried when another run got there first), so runs started at the same moment into
  the same folder each get their own.
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

Exit status: 0 on success; 2 for a bad command line or config (a value rejected by the
parser or by the constructor of the model, the data module, the Trainer or a callback); 1 for
a failure (a missing or corrupt file, a non-finite loss, a full disk, ...); 130 when
interrupted. Failures a user can fix print one ``error: ...`` line on stderr, from rank 0
only, and no traceback; anything else is a bug and keeps its traceback.
``SLOPE_LIGHTNING_DEBUG=1`` shows the traceback of every failure.
"""

from __future__ import annotations

import argparse
import difflib
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
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from slope_lightning.callbacks import NonFiniteError
from slope_lightning.checkpoints import (
    CheckpointError,
    SafeCheckpointIO,
    earlier_checkpoint_in,
    resume_point,
    run_version,
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

#: Every subcommand, with the one line ``slope-lightning --help`` shows for it.
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model: a new run in its own runs/<name>/version_N, or --ckpt_path last",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the held-out test split (data.test_fraction > 0)",
    "generate": "sample text from a checkpoint or an export",
    "study": "a quality study: methods x learning rates x seeds, each a fit, then one report",
    "bench": "benchmarks: memory, layers, kernels, step, inference, runs, unpack",
    "fetch": "fetch a pretrained checkpoint and write its tokenizer.json",
}

#: The data settings that decide which documents are in which split: a checkpoint is tested
#: only with the settings it was trained with, so its test documents were never trained on.
SPLIT_KEYS = ("sources", "val_fraction", "test_fraction", "seed", "text_key")

#: Modules whose callbacks a mistyped ``class_path`` is compared with.
CALLBACK_MODULES = (
    "slope_lightning.callbacks",
    "lightning.pytorch.callbacks",
)

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
        _check_linked_overrides(config)
        _refuse_auto_resuming_callbacks(config)
        if config.get("weights_only") is False:
            raise ConfigError(
                "--weights_only false is refused: slope-lightning loads checkpoints with "
                "weights_only=True only (tensors and plain containers, never code); drop it"
            )
        if subcommand == "test" and not config.get("data.test_fraction"):
            raise ConfigError(
                "test: data.test_fraction is 0, so there is no test split; test a run that was "
                "trained with data.test_fraction > 0 (e.g. 0.05), passing the same value here"
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            if subcommand in ("validate", "test"):
                raise ConfigError(
                    f"{subcommand} needs the weights to evaluate: pass --ckpt_path FILE, or "
                    "--ckpt_path last for the latest run's checkpoint"
                )
            _refuse_used_checkpoint_dirs(config)
            self.reserved_run_dir = _reserve_run_version(config)
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
        if subcommand == "test":
            _check_test_split_unseen(path, config)
        if subcommand == "fit" and version is not None:
            _continue_in_version(config, version)
        else:  # validate / test log into a new version of their own
            self.reserved_run_dir = _reserve_run_version(config)
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
            raise ConfigError(_instantiation_message(error, config)) from error

    def _release_reserved_run_dir(self) -> None:
        """Remove the reserved run directory if nothing was written into it."""
        directory = self.reserved_run_dir
        if directory is not None and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
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

    def test(
        self,
        model: SLoPeModule,
        datamodule: TextDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        verbose: bool = True,
    ) -> None:
        """``trainer.test`` on the checked checkpoint and the held-out test split, with
        ``weights_only=True``; logs ``test/loss`` and ``test/ppl``."""
        self.trainer.test(
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


def _reserve_run_version(config: Namespace) -> Path | None:
    """Reserve a new run's ``version_N`` under the logger's ``save_dir/name`` and point the
    logger at it; returns the directory (None: no logger root, or a version given).

    ``os.mkdir`` either creates the directory or fails because it exists, atomically, so two
    runs started at the same moment never take the same N: the loser tries N + 1. N starts
    after the largest existing version, as Lightning's own numbering does. Only rank 0 of a
    launch reserves; the other ranks never write into the run directory (Lightning sends them
    rank 0's paths).
    """
    logger_config = config.get("trainer.logger")
    if isinstance(logger_config, list):
        logger_config = logger_config[0] if logger_config else None
    init = logger_config.get("init_args") if isinstance(logger_config, Namespace) else None
    root = _logger_root(config)
    if init is None or root is None or init.get("version") is not None:
        return None
    if rank_zero_only.rank != 0:  # type: ignore[attr-defined]
        return None
    root.mkdir(parents=True, exist_ok=True)
    taken = [run_version(path, root) for path in root.glob("version_*")]
    version = max((v for v in taken if v is not None), default=-1) + 1
    while True:
        directory = root / f"version_{version}"
        try:
            directory.mkdir()
        except FileExistsError:
            version += 1
            continue
        init.version = version
        logger.info("new run: %s", directory)
        return directory


def _check_test_split_unseen(path: Path, config: Namespace) -> None:
    """Refuse to test a checkpoint on documents it may have been trained on: the split
    settings (:data:`SPLIT_KEYS`) must be those of its run, recorded in the checkpoint.

    Raises:
        ConfigError: a split setting differs from the checkpoint's (the message names it).
    """
    if not path.is_file():
        logger.warning(
            "test: %s is not a single file; its data settings were not compared with "
            "data.%s (test only runs trained with the same data settings)",
            path,
            ", data.".join(SPLIT_KEYS),
        )
        return
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(saved, dict):
        raise ConfigError(
            f"test --ckpt_path {path}: the checkpoint records no data settings, so nothing shows "
            "that its training documents exclude the test split; test a checkpoint that "
            "slope-lightning fit wrote with data.test_fraction > 0"
        )
    saved = {"test_fraction": 0.0, **saved}  # written before the test split existed
    differ = [
        f"data.{key}={config.get(f'data.{key}')!r} but the run had {saved.get(key)!r}"
        for key in SPLIT_KEYS
        if key in saved and saved.get(key) != config.get(f"data.{key}")
    ]
    if differ:
        raise ConfigError(
            f"test --ckpt_path {path}: {'; '.join(differ)}. With other split settings the "
            "test documents may be ones the model was trained on; test with the run's data "
            "settings (a run trained with data.test_fraction 0 has no test split)"
        )


_DOTTED_KEY = re.compile(r"(?<![\w.])([a-z_]+(?:\.[a-z_]+)+)\b")


def _instantiation_message(error: BaseException, config: Namespace) -> str:
    """One line for a value a constructor rejected: the config group (``model``, ``data``,
    ``trainer``, ``trainer.callbacks: <Class>``) and the constructor's own words, where a
    key it names (``optimizer.lr``) is completed to the config's (``model.optimizer.lr``)."""
    known = (pl.Callback, pl.LightningModule, pl.LightningDataModule, pl.Trainer)
    owner: type | None = None
    cause: BaseException | None = error
    while cause is not None and owner is None:  # the error, then what it was raised from
        traceback = cause.__traceback__
        while traceback is not None and owner is None:  # the outermost of our constructors
            frame = traceback.tb_frame
            this = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            if isinstance(this, known):
                owner = type(this)
            traceback = traceback.tb_next
        cause = cause.__cause__ or cause.__context__
    text = _format_parse_error(error)
    text = _DOTTED_KEY.sub(lambda m: _full_key(m.group(1), config), text)
    if owner is not None and issubclass(owner, pl.Callback):
        return f"trainer.callbacks: {owner.__name__}: {text}"
    for cls, key in ((pl.LightningModule, "model"), (pl.LightningDataModule, "data")):
        if owner is not None and issubclass(owner, cls):
            return text if text.startswith(f"{key}.") else f"{key}: {text}"
    if owner is not None and issubclass(owner, pl.Trainer):
        return f"trainer: {text}"
    if "Callback" in str(error):  # jsonargparse's wrapper around a callback's own error
        return f"trainer.callbacks: {text}"
    return text


def _full_key(key: str, config: Namespace) -> str:
    """``key`` as the config spells it: ``model.`` or ``data.`` prepended when that is a key."""
    for group in ("model", "data"):
        if f"{group}.{key}" in config:
            return f"{group}.{key}"
    return key


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
        _print_error(str(code), report)
        return 1
    except (KeyboardInterrupt, TrainingInterrupted) as error:
        if debug:
            raise
        detail = str(error) or f"interrupted; {_resume_advice(command)}"
        _print_error(_one_line(detail), report)
        return 130
    except _USAGE_ERRORS as error:
        if debug:
            raise
        _print_error(_format_parse_error(error), report)
        return 2
    except _USER_ERRORS as error:
        if debug:
            raise
        kind = "" if isinstance(error, (ValueError, RuntimeError)) else f"{type(error).__name__}: "
        message = _format_parse_error(error) if isinstance(error, ValueError) else str(error)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            message += "; free disk space (checkpoints and exports are written atomically, so "
            message += f"the previous ones are intact), then {_resume_advice(command)}"
        _print_error(f"{kind}{_one_line(message)}  [{DEBUG_ENV}=1 shows the traceback]", report)
        return 1


def _run_subcommand(argv: list[str]) -> int:
    """Dispatch ``argv`` (without the program name) to its subcommand; returns its status."""
    if not argv:
        raise ConfigError(
            f"give a subcommand: {', '.join(SUBCOMMANDS)} (see slope-lightning --help)"
        )
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(top_level_help())
        return 0
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown subcommand {command!r}; {hint}choose one of {', '.join(SUBCOMMANDS)} "
            "(slope-lightning --help says what each does)"
        )
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


def top_level_help() -> str:
    """What ``slope-lightning --help`` prints: every subcommand with one line, and the exit
    statuses."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: slope-lightning SUBCOMMAND [options]   (slope-lightning SUBCOMMAND --help)",
        "",
        "SLoPe 2:4 sparse pretraining with PyTorch Lightning.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()),
        "",
        "exit status: 0 success, 2 bad command line or config, 1 failure, 130 interrupted;",
        f"a failure prints one 'error:' line ({DEBUG_ENV}=1 shows its traceback).",
    ]
    return "\n".join(lines)


def _resume_advice(command: str) -> str:
    """How to continue after an interrupted or failed ``command``, in that command's terms."""
    if command == "fit":
        return "resume with --ckpt_path last"
    if command == "study":
        return "run the same study command again to resume (finished runs are kept)"
    return "run the command again"


def _print_error(message: str, report: bool) -> None:
    """The one ``error:`` line on stderr (rank 0 only: ``report``)."""
    if report:
        print(f"error: {message}", file=sys.stderr)


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
    "- Not a valid subclass of",
    "Subclass types expect one of:",
    "- a class path (str)",
    "- a dict with",
    "- a dict without",
)
_BAD_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")


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
    detail = ""
    if not isinstance(error, ConfigError) and (
        "Parser key" in text or "Does not validate against any of the" in text
    ):
        keys: list[str] = []
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
    bad_path = _BAD_CLASS_PATH.search(text)
    if bad_path and not _importable(bad_path.group(1)):
        path = bad_path.group(1)
        key = summary.split(": ", 1)[0] if ": " in summary else "class_path"
        close = difflib.get_close_matches(path, _callback_paths(), n=1, cutoff=0.6)
        hint = f"; the closest importable one is {close[0]!r}" if close else ""
        summary = f"{key}: class_path {path!r} cannot be imported ({detail}){hint}"
    if "unrecognized arguments" in summary or "is not accepted" in summary:
        summary += " (--help lists the accepted options)"
    return _one_line(summary)


def _importable(path: str) -> bool:
    """Whether ``package.module.Name`` names something importable."""
    module_name, _, name = path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module_name), name)
    except (ImportError, ValueError):
        return False


def _callback_paths() -> list[str]:
    """``module.Class`` of every callback that :data:`CALLBACK_MODULES` export."""
    paths = []
    for module_name in CALLBACK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        names = getattr(module, "__all__", None) or list(vars(module))
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, type) and issubclass(value, pl.Callback) and name[0] != "_":
                paths.append(f"{module_name}.{name}")
    return paths


if __name__ == "__main__":
    sys.exit(main())
