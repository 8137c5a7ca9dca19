"""How a failure of ``slope-lightning`` reaches the user: one ``error:`` line and an exit status.

Exit status: 0 on success; 2 for a bad command line or config (a value rejected by the parser
or by the constructor of the model, the data module, the Trainer or a callback); 1 for a
failure (a missing or corrupt file, a non-finite loss, a full disk, ...); 130 when
interrupted. Failures a user can fix print one ``error: ...`` line on stderr, from rank 0
only, with advice that applies to the command that failed, and no traceback; anything else is
a bug and keeps its traceback. ``SLOPE_LIGHTNING_DEBUG=1`` shows the traceback of every
failure.

jsonargparse reports a bad value as a tree of "Parser key" lines, union alternatives and the
given value; :func:`format_parse_error` keeps the key path and the innermost reason, and names
the closest importable class for a mistyped ``class_path``.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import re
import sys

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException

from slope_lightning.callbacks import NonFiniteError
from slope_lightning.checkpoints import CheckpointError
from slope_lightning.data.artifacts import CorruptCacheError
from slope_lightning.generate import GenerateUsageError
from slope_lightning.sparse.selection import NothingSparsifiedError
from slope_lightning.study import StudyConfigError, StudyIncomplete

#: Environment variable: set to 1 to see the traceback of every failure.
DEBUG_ENV = "SLOPE_LIGHTNING_DEBUG"

#: Modules whose callbacks a mistyped ``class_path`` is compared with.
CALLBACK_MODULES = (
    "slope_lightning.callbacks",
    "lightning.pytorch.callbacks",
)


class ConfigError(ValueError):
    """A command line or config that cannot work, found before anything is built."""


class TrainingInterrupted(RuntimeError):
    """``fit`` was interrupted (Ctrl-C); the message says where its state was saved."""


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
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


def describe_failure(error: BaseException, command: str) -> tuple[int, str] | None:
    """The exit status and the one line (without ``error:``) for a failure of ``command``.

    Args:
        error: what the subcommand raised (not ``SystemExit``: :func:`~slope_lightning.cli.main`
            returns its code).
        command: the subcommand that failed (``fit``, ``study``, ...), for the advice.

    Returns:
        ``(130, line)`` when interrupted, ``(2, line)`` for a bad command line or config,
        ``(1, line)`` for a failure a user can fix; None for anything else (a bug, which
        keeps its traceback).
    """
    if isinstance(error, (KeyboardInterrupt, TrainingInterrupted)):
        return 130, one_line(str(error) or f"interrupted; {resume_advice(command)}")
    if isinstance(error, _USAGE_ERRORS):
        return 2, format_parse_error(error)
    if _is_checkpoint_exception(error):
        # torch.distributed.checkpoint's load failure derives from BaseException: a corrupt
        # shard of a sharded (FSDP2) checkpoint, found while Lightning restores it.
        return 1, (
            f"cannot load the sharded checkpoint: {_checkpoint_failure(error)}; the "
            "checkpoint directory is corrupt: resume from another checkpoint of the run "
            f"(its crash/ or checkpoints/ directory)  [{DEBUG_ENV}=1 shows the traceback]"
        )
    if isinstance(error, _USER_ERRORS):
        kind = "" if isinstance(error, (ValueError, RuntimeError)) else f"{type(error).__name__}: "
        message = format_parse_error(error) if isinstance(error, ValueError) else str(error)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            message += "; free disk space (checkpoints and exports are written atomically, so "
            message += f"the previous ones are intact), then {resume_advice(command)}"
        return 1, f"{kind}{one_line(message)}  [{DEBUG_ENV}=1 shows the traceback]"
    return None


def _is_checkpoint_exception(error: BaseException) -> bool:
    """Whether ``error`` is torch.distributed.checkpoint's ``CheckpointException``."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(error, CheckpointException)


def _checkpoint_failure(error: BaseException) -> str:
    """The first rank's failure inside a ``CheckpointException``, as one short line (its
    ``str`` is every rank's traceback)."""
    failures = getattr(error, "failures", None) or {}
    for rank, (cause, _trace) in sorted(failures.items()):
        return f"rank {rank}: {type(cause).__name__}: {one_line(str(cause))[:300]}"
    return type(error).__name__


def resume_advice(command: str) -> str:
    """How to continue after an interrupted or failed ``command``, in that command's terms."""
    if command == "fit":
        return "resume with --ckpt_path last"
    if command == "study":
        return "run the same study command again to resume (finished runs are kept)"
    return "run the command again"


def print_error(message: str, report: bool) -> None:
    """The one ``error:`` line on stderr (rank 0 only: ``report``)."""
    if report:
        print(f"error: {message}", file=sys.stderr)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split()) or "(no message)"


_DOTTED_KEY = re.compile(r"(?<![\w.])([a-z_]+(?:\.[a-z_]+)+)\b")


def instantiation_message(error: BaseException, config: Namespace) -> str:
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
    text = format_parse_error(error)
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


def format_parse_error(error: BaseException) -> str:
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
    return one_line(summary)


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
