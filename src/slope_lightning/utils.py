"""Small shared utilities: file digests, atomic writes, state dicts as safetensors, timing and
the machine a measurement ran on.

A leaf module: it imports only the standard library, torch and safetensors, so every layer
(the torch-only ``sparse/`` included) can use it. One of each: no other module hashes files,
writes files atomically, dedupes a state dict's tensors, reads safetensors, times code or
describes the machine on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

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


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of the floating tensors that hold NaN or inf (a sync point on a GPU)."""
    return [
        name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()
    ]


def load_safetensors(path: Path, fix: str) -> dict[str, Tensor]:
    """The tensors of the safetensors file at ``path``, on the CPU.

    Raises:
        ValueError: the file is unreadable or truncated (the message ends with ``fix``).
    """
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); it may be truncated: {fix}"
        ) from error


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
