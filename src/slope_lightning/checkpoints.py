"""One home for checkpoints: safe loading and saving, a run's checkpoints, ``--ckpt_path last``.

* :func:`load_checkpoint_file` / :class:`SafeCheckpointIO`: every checkpoint is read with
  ``torch.load(..., weights_only=True)`` whatever the torch version's default, and a file that
  is unsafe, truncated or not a checkpoint fails with an error naming the file and the fix;
  every local save is atomic.
* :func:`checkpoint_step`, :func:`is_sharded_checkpoint`: what a checkpoint is, read cheaply.
* :func:`safetensors_rows`: a dense ``.safetensors`` file read by rows (each rank its own).
* :func:`optimizer_state_by_name`: an optimizer state keyed by parameter names, not positions.
* :func:`load_sharded_state_dict`: the full weights of a sharded checkpoint (FSDP2's
  ``last.ckpt/`` folder), read in one process without a process group.
* :func:`run_checkpoints`, :func:`find_resume_checkpoint`, :func:`resume_point`,
  :func:`run_version`: the checkpoints of a run, and what ``--ckpt_path last`` (or a file)
  resumes; the CLI calls these and keeps no logic of its own about them.

The crash checkpoint itself is written by :class:`~slope_lightning.callbacks.CrashCheckpoint`
into ``<run dir>/crash`` (:data:`CRASH_DIRNAME`), which :func:`run_checkpoints` finds.
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint
from torch import Tensor, nn
from typing_extensions import override

from slope_lightning.sparse.dense_rows import SafetensorsRows
from slope_lightning.utils import atomic_path, first_line, load_safetensors

logger = logging.getLogger(__name__)

#: Sub-directory of a run's log directory that holds its crash checkpoint.
CRASH_DIRNAME = "crash"
#: Sub-directory of a run's log directory that holds ModelCheckpoint's files (Lightning's).
CHECKPOINTS_DIRNAME = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot or must not be loaded (unsafe, truncated, not ours)."""


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
            f"refusing to load checkpoint {path}: it holds {_unsafe_content(error)}, not only "
            "tensors and plain containers. Checkpoints written by slope-lightning never do, so "
            "this file is not one of ours or was tampered with; delete it, or use a checkpoint "
            "you trust"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt (for instance "
            f"written during a crash or on a full disk): {first_line(error)}. Delete it and "
            "resume from another checkpoint of the run (e.g. its crash/ or checkpoints/ "
            "directory), or start a new run"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a Lightning "
            "checkpoint dictionary; pass a .ckpt file written by the Trainer"
        )
    return checkpoint


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _unsafe_content(error: pickle.UnpicklingError) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words: the class it met (torch's
    own message goes on to suggest ``weights_only=False``, which we never do)."""
    found = _UNSUPPORTED_GLOBAL.search(str(error))
    return f"a pickled {found.group(1)}" if found else "pickled objects"


def load_safetensors_file(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Read a ``.safetensors`` file of tensors, reporting a missing or unreadable file by name.

    Safetensors holds no code, so any file is safe to read; one that is truncated (an
    interrupted download or copy) or not safetensors at all fails here with a
    :class:`CheckpointError` instead of safetensors' own error.

    Args:
        path: a local ``.safetensors`` file.
        device: where the tensors are placed (default: CPU).

    Returns:
        The tensors by name.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file is truncated, corrupt or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; pass an existing file")
    return load_safetensors(path, "fetch or save it again", error=CheckpointError, device=device)


def safetensors_rows(path: str | Path) -> SafetensorsRows:
    """A ``.safetensors`` file of dense weights, read by rows (each rank only its own; see
    :func:`~slope_lightning.sparse.dense_rows.load_dense_rows`), reporting a missing or
    unreadable file as :func:`load_safetensors_file` does.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file is truncated, corrupt or not safetensors.
    """
    return SafetensorsRows(path, error=CheckpointError, fix="fetch or save it again")


#: The file of a sharded (distributed) Lightning checkpoint directory that holds everything
#: but the tensors, ``global_step`` included; rank 0 writes it after the shards.
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a directory of shards written by
    ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` with its ``meta.pt``."""
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA).is_file()


#: torch.distributed.checkpoint's index of a sharded checkpoint: every tensor's chunks and the
#: shard file (and byte range) that holds each.
SHARD_INDEX = ".metadata"


class _ShardIndexUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` index and nothing else: torch.distributed.checkpoint's own
    classes, torch's dtypes, ``torch.Size`` and layouts, and paths. Anything else (code, in a
    crafted file) is refused, where torch.distributed.checkpoint would unpickle it all."""

    @override
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in _INDEX_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if allowed:
            found = super().find_class(module, name)
            if module in ("torch", "torch.serialization") or isinstance(found, type):
                return found
        raise _RefusedGlobal(f"Unsupported global: GLOBAL {module}.{name}")


class _RefusedGlobal(pickle.UnpicklingError):
    """:class:`_ShardIndexUnpickler` met something other than index entries."""


_INDEX_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


#: What to do about an incomplete sharded checkpoint when resuming or evaluating from it.
RESUME_ADVICE = (
    "copy the complete directory again, or resume from another checkpoint of the run "
    "(e.g. its crash/ or checkpoints/ directory)"
)


def check_sharded_checkpoint(path: str | Path, advice: str = RESUME_ADVICE) -> None:
    """Check that a sharded checkpoint directory is complete, before anything loads it.

    Its ``.metadata`` (torch.distributed.checkpoint's index, read with an unpickler that
    accepts nothing but index entries) names the shard file and byte range of every tensor;
    each file must be there and long enough. Without this check a missing shard fails deep
    inside ``torch.distributed.checkpoint.load`` with a ``CheckpointException`` (a
    ``BaseException``: a traceback per rank, no message of ours).

    Args:
        path: a sharded checkpoint directory (see :func:`is_sharded_checkpoint`).
        advice: what the error tells the user to do, in the terms of the command at hand.

    Raises:
        CheckpointError: the index is missing, unreadable or holds other objects, or a shard
            file it names is missing or shorter than the index says.
    """
    path = Path(path)
    index_path = path / SHARD_INDEX
    if not index_path.is_file():
        raise CheckpointError(
            f"sharded checkpoint {path} is incomplete: it has no {SHARD_INDEX} (the index "
            f"torch.distributed.checkpoint writes last); {advice}"
        )
    try:
        with index_path.open("rb") as stream:
            index = _ShardIndexUnpickler(stream).load()
    except _RefusedGlobal as error:
        raise CheckpointError(
            f"refusing to load sharded checkpoint {path}: its {SHARD_INDEX} holds "
            f"{_unsafe_content(error)}, not only torch.distributed.checkpoint's index; delete "
            "it, or use a checkpoint you trust"
        ) from error
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        OSError,
    ) as error:
        raise CheckpointError(
            f"cannot read {index_path}: it is truncated or corrupt ({first_line(error)}); {advice}"
        ) from error
    storage = getattr(index, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(
            f"{index_path} is not a torch.distributed.checkpoint index (it holds a "
            f"{type(index).__name__}); pass a checkpoint directory written by the Trainer"
        )
    needed: dict[str, int] = {}  # shard file -> bytes it must have
    for entry in storage.values():
        name = str(getattr(entry, "relative_path", ""))
        end = int(getattr(entry, "offset", 0) or 0) + int(getattr(entry, "length", 0) or 0)
        needed[name] = max(needed.get(name, 0), end)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(
                f"sharded checkpoint {path} is incomplete: shard file {name} is missing "
                f"({len(needed)} shard files are named by its {SHARD_INDEX}); {advice}"
            )
        if shard.stat().st_size < size:
            raise CheckpointError(
                f"sharded checkpoint {path} is incomplete: shard file {name} has "
                f"{shard.stat().st_size} bytes, its {SHARD_INDEX} needs {size} (truncated); "
                f"{advice}"
            )


def load_sharded_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) ``state_dict`` of a sharded checkpoint, read in this one process.

    ``ModelParallelStrategy`` writes the LightningModule's state dict with
    ``torch.distributed.checkpoint`` (one shard per rank, keys ``state_dict.<name>``) beside
    ``meta.pt``. Every tensor is allocated whole on the CPU from the checkpoint's metadata and
    filled from all the shards, without a process group (``no_dist``); the optimizer state is
    not read.

    Args:
        path: the sharded checkpoint directory (e.g. ``checkpoints/last.ckpt/``).

    Returns:
        The module's state dict (keys as in ``LightningModule.state_dict()``), on the CPU.

    Raises:
        FileNotFoundError: ``path`` is not a sharded checkpoint directory.
        CheckpointError: its metadata or a shard is missing or unreadable.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a sharded checkpoint (a directory with {SHARDED_METADATA}); pass "
            "the directory a sharded save wrote (e.g. checkpoints/last.ckpt/ under FSDP2)"
        )
    # its index read safely, every shard there and whole
    check_sharded_checkpoint(path, advice="use another checkpoint of the run, or its export")
    prefix = "state_dict."
    try:
        reader = dcp.FileSystemReader(path)
        entries = reader.read_metadata().state_dict_metadata
        state = {
            key: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in entries.items()
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # one process on purpose: torch warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    # CheckpointException derives from BaseException: named here so it never escapes
    except (CheckpointException, RuntimeError, OSError, ValueError, EOFError) as error:
        raise CheckpointError(
            f"cannot read sharded checkpoint {path}: a shard or its metadata is missing or "
            f"corrupt ({first_line(error)}); use another checkpoint of the run, or its export"
        ) from error
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


def _checkpoint_mtime(path: Path) -> float:
    """When a checkpoint was completed: a file's mtime, a sharded directory's ``meta.pt``'s."""
    return (path / SHARDED_METADATA if path.is_dir() else path).stat().st_mtime


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` recorded in a Lightning checkpoint, read safely and cheaply.

    The file is memory-mapped (``weights_only=True``), so large checkpoints are not read. A
    sharded checkpoint (a directory, from FSDP2) is checked complete
    (:func:`check_sharded_checkpoint`) and read from its ``meta.pt``.

    Args:
        path: a checkpoint file, or a sharded checkpoint directory.

    Returns:
        Its global step (optimizer steps taken).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory that is not a sharded
            checkpoint.
        CheckpointError: the file is unsafe, corrupt, or has no integer ``global_step``; a
            sharded checkpoint is incomplete.
    """
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise FileNotFoundError(
                f"checkpoint {path} is a directory but not a sharded Lightning checkpoint (it "
                f"has no {SHARDED_METADATA}); pass a .ckpt file, the directory a sharded save "
                "wrote (e.g. checkpoints/last.ckpt/ under FSDP2), or `last`"
            )
        check_sharded_checkpoint(path)
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
                    f"refusing to load checkpoint {path}: {first_line(error)}"
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


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint to resume or evaluate: the file, its step and its run.

    Attributes:
        path: the checkpoint file (or sharded checkpoint directory).
        step: its ``global_step``.
        version: N when ``path`` lies in ``<runs root>/version_N/``, else None.
    """

    path: Path
    step: int
    version: int | None


def runs_root(save_dir: str | None, name: str | None) -> Path | None:
    """Where a TensorBoard / CSV logger keeps its runs (``save_dir/name/version_N``): the
    parent of the version directories, or None without a ``save_dir``."""
    if save_dir is None:
        return None
    return Path(save_dir) / name if name else Path(save_dir)


def resume_point(
    ckpt_path: str, root: Path | None, checkpoint_dirs: Sequence[Path] = ()
) -> ResumePoint | None:
    """Resolve ``--ckpt_path`` to a checked checkpoint, before anything is built.

    Args:
        ckpt_path: ``"last"`` (the latest run's most advanced checkpoint, see
            :func:`find_resume_checkpoint`) or a checkpoint file / sharded directory.
        root: the logger's runs root (:func:`runs_root`), or None.
        checkpoint_dirs: explicit checkpoint directories (a checkpoint callback's dirpath).

    Returns:
        The checkpoint, its step and its run's version; None for ``"last"`` when there is no
        checkpoint to resume.

    Raises:
        FileNotFoundError: ``ckpt_path`` names a missing file.
        CheckpointError: the checkpoint is unsafe, unreadable or records no step.
    """
    if ckpt_path == "last":
        found = find_resume_checkpoint(root, checkpoint_dirs)
        if found is None:
            return None
        path, step = found
    else:
        path = Path(ckpt_path)
        step = checkpoint_step(path)  # FileNotFoundError / CheckpointError, by name
    version = run_version(path, root) if root is not None else None
    return ResumePoint(path, step, version)


def earlier_checkpoint_in(directories: Iterable[Path]) -> tuple[Path, Path] | None:
    """The first of ``directories`` that already holds a checkpoint (a resumable one, see
    :func:`run_checkpoints`, or any ``*.ckpt``) and that checkpoint, or None: a new run must
    not write its checkpoints beside another run's."""
    for directory in directories:
        existing = run_checkpoints(directory) or sorted(Path(directory).glob("*.ckpt"))
        if existing:
            return Path(directory), existing[0]
    return None


def written_crash_checkpoint(callbacks: Iterable[Callback]) -> Path | None:
    """The crash checkpoint a run wrote, or None: the ``ckpt_path`` of the first checkpoint
    callback (e.g. :class:`~slope_lightning.callbacks.CrashCheckpoint`) whose file exists."""
    for callback in callbacks:
        path = getattr(callback, "ckpt_path", None)
        if isinstance(callback, Checkpoint) and path and Path(path).is_file():
            return Path(path)
    return None


def optimizer_state_by_name(state: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``state`` (an optimizer's state dict) with every parameter key that is a position in
    ``module.parameters()`` replaced by that parameter's name in ``module.named_parameters()``
    (keys that are names already are kept).

    This is what Lightning's loader (which takes both) needs to map each entry to its own
    parameter when the positions have moved, e.g. once LazyLoRA has added adapters.

    Raises:
        ValueError: a position beyond the module's parameters.
    """
    names = [name for name, _ in module.named_parameters()]

    def by_name(key: object) -> object:
        if not isinstance(key, int):
            return key
        if not 0 <= key < len(names):
            raise ValueError(
                f"optimizer state holds parameter position {key}, but the module has "
                f"{len(names)} parameters: the state is not this module's optimizer's"
            )
        return names[key]

    groups = [
        {**group, "params": [by_name(key) for key in group["params"]]}
        for group in state.get("param_groups", [])
    ]
    return {
        **state,
        "state": {by_name(key): value for key, value in state.get("state", {}).items()},
        "param_groups": groups,
    }
