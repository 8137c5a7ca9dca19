"""Integrity of cached artifacts: every file the data pipeline caches (a trained tokenizer, the
token files) has a metadata record written after it, and is checked against that record
whenever it is opened.

The record holds the file's byte size and sha256, so a truncated, extended, overwritten or
tampered file is caught before training instead of failing deep in the model (an id beyond
the embedding) or, worse, being trained on silently. Metadata is written last and atomically:
a file without its record was never completed and is rebuilt, never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slope_lightning.utils import atomic_write, sha256_file


class CorruptCacheError(RuntimeError):
    """A cached artifact (tokenizer, token file or their metadata) does not match its record.

    The message names the file, what is wrong with it, and how to rebuild it.
    """


def corrupt(path: Path, problem: str, fix: str) -> CorruptCacheError:
    """The error for ``path``: ``"<path>: <problem>. <fix>"``, one format for every artifact."""
    return CorruptCacheError(f"{path}: {problem}. {fix}")


@dataclass(frozen=True)
class FileRecord:
    """What is recorded about a finished file: its size in bytes and its sha256."""

    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        """Measure ``path`` (one read of the file, for the checksum)."""
        return cls(size=path.stat().st_size, sha256=sha256_file(path))


def write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    """Write a metadata record atomically; call it after the files it describes are in place."""
    atomic_write(path, json.dumps(meta, indent=2) + "\n")


def read_meta(
    path: Path, required: Mapping[str, type | tuple[type, ...]], fix: str
) -> dict[str, Any]:
    """Read a metadata record and check that it holds ``required`` keys of the given types.

    Args:
        path: the ``meta.json`` file; it must exist.
        required: key -> expected type(s) of its value.
        fix: what the error tells the user to do (e.g. which folder to delete).

    Raises:
        CorruptCacheError: the file is not JSON, not an object, or lacks a key or its type.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise corrupt(path, f"the metadata is not valid JSON ({error})", fix) from error
    if not isinstance(meta, dict):
        raise corrupt(path, f"the metadata is a JSON {type(meta).__name__}, not an object", fix)
    for key, kind in required.items():
        value = meta.get(key)
        # bool is an int to isinstance; a count or size written as true/false is still corrupt
        if key not in meta or not isinstance(value, kind) or isinstance(value, bool):
            raise corrupt(path, f"the metadata has no valid {key!r} field (found {value!r})", fix)
    return meta


def check_size(path: Path, expected: int, meta_path: Path, fix: str) -> None:
    """Check that ``path`` exists and has the ``expected`` size in bytes (free: one ``stat``).

    Raises:
        CorruptCacheError: the file is missing, truncated or has extra bytes.
    """
    if not path.is_file():
        raise corrupt(path, f"the file is missing, though {meta_path} records it", fix)
    size = path.stat().st_size
    if size != expected:
        how = "truncated" if size < expected else "extra bytes appended"
        raise corrupt(
            path, f"the file has {size} bytes, but {meta_path} records {expected} ({how})", fix
        )


def check_checksum(path: Path, expected: str, meta_path: Path, fix: str) -> None:
    """Check the sha256 of ``path``: catches bytes changed in place, which keep the size.

    Raises:
        CorruptCacheError: the digest differs from the recorded one.
    """
    digest = sha256_file(path)
    if digest != expected:
        raise corrupt(
            path,
            f"the file's sha256 is {digest}, but {meta_path} records {expected} (its bytes were "
            f"changed after it was written)",
            fix,
        )


def check_file(path: Path, record: FileRecord, meta_path: Path, fix: str) -> None:
    """Check ``path`` against its ``record``: size first (it says "truncated" or "extra bytes"
    plainly), then checksum.

    Raises:
        CorruptCacheError: the file is missing, or its size or sha256 differ from the record.
    """
    check_size(path, record.size, meta_path, fix)
    check_checksum(path, record.sha256, meta_path, fix)
