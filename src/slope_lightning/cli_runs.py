"""Run directories of ``slope-lightning``: one ``<save_dir>/<name>/version_N`` per run.

A plain ``fit`` is always a new run in a new version directory, which holds everything of that
run: TensorBoard events, ``config.yaml``, ``checkpoints/`` (``last.ckpt`` and the best),
``crash/`` and ``export/``. The directory is reserved before anything else happens
(:func:`reserve_run_version`), so runs started at the same moment into the same folder each
get their own. A resumed ``fit`` logs into the directory of the run it resumes
(:func:`continue_in_version`); ``validate`` and ``test`` log into a new version of their own.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from slope_lightning.checkpoints import earlier_checkpoint_in, run_version, runs_root
from slope_lightning.cli_errors import ConfigError

logger = logging.getLogger(__name__)


def _logger_init_args(config: Namespace) -> Namespace | None:
    """The ``init_args`` of the (first) logger in the config; None when there is none."""
    logger_config = config.get("trainer.logger")
    if isinstance(logger_config, list):
        logger_config = logger_config[0] if logger_config else None
    init = logger_config.get("init_args") if isinstance(logger_config, Namespace) else None
    return init if isinstance(init, Namespace) else None


def logger_root(config: Namespace) -> Path | None:
    """``save_dir/name`` of a TensorBoard/CSV logger in the config (its version dirs' parent)."""
    init = _logger_init_args(config)
    if init is None:
        return None
    return runs_root(init.get("save_dir") or init.get("root_dir"), init.get("name"))


def _run_dir_of(root: Path, version: int | str) -> Path | None:
    """The directory of the run a logger ``version`` names under ``root``, if it holds one (a
    ``config.yaml``: every run saves its config there first)."""
    directory = root / (version if isinstance(version, str) else f"version_{version}")
    return directory if (directory / "config.yaml").is_file() else None


def continue_in_version(config: Namespace, version: int) -> None:
    """Log a resumed run into the directory of the run it resumes: unless a version is set
    that holds no run yet (a version pinned by a run's saved ``config.yaml`` names that run,
    which may not be the one resumed)."""
    init = _logger_init_args(config)
    root = logger_root(config)
    if init is None or root is None:
        return
    pinned = init.get("version")
    if pinned is None or _run_dir_of(root, pinned) is not None:
        init.version = version


def reserve_run_version(config: Namespace) -> Path | None:
    """Reserve a new run's ``version_N`` under the logger's ``save_dir/name`` and point the
    logger at it; returns the directory (None: no logger root, or a version given that holds
    no run yet). A version given that names an existing run (every saved ``config.yaml``
    pins its own) is replaced by a new one, with a warning: a new fit, ``validate`` or
    ``test`` never writes into another run's directory.

    ``os.mkdir`` either creates the directory or fails because it exists, atomically, so two
    runs started at the same moment never take the same N: the loser tries N + 1. N starts
    after the largest existing version, as Lightning's own numbering does. Only rank 0 of a
    launch reserves; the other ranks never write into the run directory (Lightning sends them
    rank 0's paths).
    """
    init = _logger_init_args(config)
    root = logger_root(config)
    if init is None or root is None:
        return None
    pinned = init.get("version")
    if pinned is not None:
        existing = _run_dir_of(root, pinned)
        if existing is None:
            return None  # a version of the user's choosing that holds no run yet
        # A run's own config.yaml pins its version: reused (`--config <run>/config.yaml`), it
        # would write this run into that run's folder, over its config and checkpoints.
        if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
            logger.warning(
                "trainer.logger.init_args.version %s names the run in %s (a saved config.yaml "
                "pins its run's version): this run gets a new version directory instead; to "
                "continue that run, add --ckpt_path last",
                pinned,
                existing,
            )
        init.version = None
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


def release_if_empty(directory: Path | None) -> bool:
    """Remove a reserved run directory if nothing was written into it; returns whether it was."""
    if directory is not None and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        return True
    return False


def callback_configs(config: Namespace) -> list[tuple[type, Namespace]]:
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


def explicit_checkpoint_dirs(config: Namespace) -> list[Path]:
    """The ``dirpath`` of every checkpoint callback that sets one in the config."""
    return [
        Path(init.dirpath)
        for cls, init in callback_configs(config)
        if isinstance(cls, type) and issubclass(cls, Checkpoint) and init.get("dirpath")
    ]


def refuse_used_checkpoint_dirs(config: Namespace) -> None:
    """A new run must not write its checkpoints beside another run's.

    Raises:
        ConfigError: a checkpoint callback's ``dirpath`` already holds checkpoints.
    """
    used = earlier_checkpoint_in(explicit_checkpoint_dirs(config))
    if used is not None:
        directory, existing = used
        raise ConfigError(
            f"a checkpoint callback's dirpath {str(directory)!r} already holds checkpoints "
            f"of an earlier run ({existing.name}); a new run would write beside them. "
            "Remove dirpath from the config (each run then keeps its checkpoints in its "
            "own version directory), point it at an empty directory, or resume with "
            "--ckpt_path last"
        )
