"""Token streams over memory-mapped token files, and the sampler that serves them to each rank
so that training resumes exactly. Torch and NumPy only: usable without Lightning.

How the training stream is built, and why it resumes exactly:

* Sample ``g`` of the stream (``g = 0, 1, 2, ...``, never reset) is the window of
  ``seq_len + 1`` tokens at an offset drawn from a generator seeded with ``(seed, g)``; nothing
  else decides it (:class:`RandomWindows`).
* Rank ``r`` of ``W`` serves samples ``r, r + W, r + 2W, ...`` (:class:`ResumableSampler`), so
  the union of the ranks' batches at a step is the single-process batch of ``W`` times the size.
* Each pass starts at the number of samples all ranks consumed before it (``start_fn``), so a
  consumer that counts what it trained on resumes mid-epoch without replaying or skipping a
  sample. ``TextDataModule`` supplies that count from the Trainer.

How validation is sampled (:class:`ValidationWindows`): the split is cut into non-overlapping
windows inside each source's spans (a window never mixes two sources), each source's windows
are shuffled with a generator seeded by the split's seed, and the sources are interleaved in
proportion to their window counts. The order is fixed for a given split, so every validation
of every run sees the same windows, and any prefix of it (``limit_val_batches``) is a
representative sample of the whole split: each source holds its share of the prefix to within
one window.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path, PurePath
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class TokenFile:
    """A flat file of token ids, memory-mapped lazily in each process that reads it.

    Not the array but its path travels to dataloader workers, so spawned workers do not copy it.
    """

    def __init__(self, path: str | Path, dtype: np.dtype | str) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.memmap:
        """The ids, mapped on first use in this process (each dataloader worker maps its own)."""
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._array

    def window(self, offset: int, length: int) -> torch.Tensor:
        """Tokens ``[offset, offset + length)`` as an int64 tensor."""
        return torch.from_numpy(self.array[offset : offset + length].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the path, never the mapping: workers map the file themselves."""
        return {**self.__dict__, "_array": None}


def _require_window(tokens: TokenFile, seq_len: int) -> None:
    """Raise unless ``tokens`` holds one window of ``seq_len`` inputs plus its target."""
    if tokens.num_tokens < seq_len + 1:
        raise ValueError(
            f"{tokens.path} has {tokens.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}."
        )


class RandomWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training windows: item ``g`` is ``(x, y)`` from the window at a pseudo-random offset that
    depends only on ``(seed, g)``.

    ``len()`` is one epoch of samples, but any ``g >= 0`` is valid: later epochs continue the
    stream with ``g >= len()`` (see :class:`ResumableSampler`).
    """

    def __init__(self, tokens: TokenFile, seq_len: int, seed: int, samples_per_epoch: int) -> None:
        _require_window(tokens, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def offset(self, index: int) -> int:
        """Start of window ``index``: uniform over every start that leaves room for the target."""
        rng = np.random.default_rng((self.seed, index))
        return int(rng.integers(0, self.tokens.num_tokens - self.seq_len))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            raise IndexError(f"Sample index must be >= 0, got {index}.")
        chunk = self.tokens.window(self.offset(index), self.seq_len + 1)  # (T + 1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)


class ConsecutiveWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Validation windows: non-overlapping, consecutive, in file order; item ``i`` starts at
    ``i * seq_len`` (its target reaches one token into the next window)."""

    def __init__(self, tokens: TokenFile, seq_len: int) -> None:
        _require_window(tokens, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range [0, {len(self)}).")
        chunk = self.tokens.window(index * self.seq_len, self.seq_len + 1)  # (T + 1,)
        return chunk[:-1], chunk[1:]


class ValidationWindows(Dataset[tuple[torch.Tensor, ...]]):
    """Validation windows of every source, in a fixed stratified random order.

    Windows of ``seq_len`` inputs (plus the target's extra token) are cut, without overlap,
    inside each span of one source, so every window belongs to exactly one source; spans too
    short for a window contribute none. Each source's windows are shuffled by
    ``np.random.default_rng(seed)``, and the sources are merged by the key ``(j + 1/2) / n_s``
    of a source's ``j``-th window out of ``n_s`` (ties to the lower source index): any prefix
    of ``k`` windows holds each source's share of ``k`` to within one window, so
    ``limit_val_batches`` samples the whole split, not the first document.

    Item ``i`` is ``(x, y)``, or ``(x, y, source)`` with ``with_source``, ``source`` the
    window's index into :attr:`source_names` as a 0-d int64 tensor (a batch gets ``(B,)``).

    Args:
        tokens: the validation token file.
        seq_len: tokens per window.
        spans: ``(start, end, source index)`` runs tiling the file (see
            :meth:`~slope_lightning.data.prepare.PreparedTokens.spans`).
        sources: the source labels the span indices refer to.
        seed: seed of the order (the split's seed: the same split gives the same order).
        with_source: add each window's source index to its item.

    Raises:
        ValueError: no span holds ``seq_len + 1`` tokens.
    """

    def __init__(
        self,
        tokens: TokenFile,
        seq_len: int,
        spans: Sequence[tuple[int, int, int]],
        sources: Sequence[str],
        seed: int,
        with_source: bool = False,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.with_source = with_source
        self.source_labels = tuple(sources)
        per_source: list[list[np.ndarray]] = [[] for _ in self.source_labels]
        for start, end, index in spans:
            # window starts o with o + seq_len + 1 <= end: the target stays inside the span
            per_source[index].append(np.arange(start, end - seq_len, seq_len, dtype=np.int64))
        rng = np.random.default_rng(seed)
        offsets, source_ids, keys = [], [], []
        for index, parts in enumerate(per_source):
            found = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            count = len(found)
            offsets.append(found[rng.permutation(count)])
            source_ids.append(np.full(count, index, dtype=np.int64))
            keys.append((np.arange(count) + 0.5) / max(count, 1))
        all_offsets, all_ids = np.concatenate(offsets), np.concatenate(source_ids)
        if len(all_offsets) == 0:
            raise ValueError(
                f"{tokens.path}: no source's documents hold seq_len + 1 = {seq_len + 1} tokens "
                f"in a row, so there is no validation window. Lower seq_len or add text."
            )
        order = np.lexsort((all_ids, np.concatenate(keys)))  # by key, then source index
        self.offsets = all_offsets[order]  # (windows,) start token of each window, in order
        self.source_ids = all_ids[order]  # (windows,) its source index
        self.windows_per_source = tuple(
            int(n) for n in np.bincount(all_ids, minlength=len(per_source))
        )

    @property
    def source_names(self) -> tuple[str, ...]:
        """Short names of the sources, usable in metric keys (see :func:`source_metric_names`)."""
        return source_metric_names(self.source_labels)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range [0, {len(self)}).")
        chunk = self.tokens.window(int(self.offsets[index]), self.seq_len + 1)  # (T + 1,)
        if self.with_source:
            return chunk[:-1], chunk[1:], torch.tensor(int(self.source_ids[index]))
        return chunk[:-1], chunk[1:]


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def source_metric_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Short, unique names for source labels, safe in metric keys such as ``val/ppl/<name>``.

    A label's last path component with something left after dropping its extension and every
    character but letters, digits, ``_`` and ``-`` (``"notes/*.txt"`` gives ``"notes"``,
    ``"data/a.jsonl"`` gives ``"a"``, ``"wiki"`` stays); ``"source"`` if none; repeated names
    get ``_2``, ``_3``, ...

    Example:
        >>> source_metric_names(["shakespeare", "wiki", "notes/*.txt", "b/notes.txt"])
        ('shakespeare', 'wiki', 'notes', 'notes_2')
    """
    names: list[str] = []
    for label in labels:
        parts = PurePath(label).parts
        name = "source"
        for depth, part in enumerate(reversed(parts)):
            cleaned = _UNSAFE.sub("", PurePath(part).stem if depth == 0 else part)
            if cleaned:
                name = cleaned
                break
        unique, count = name, 1
        while unique in names:
            count += 1
            unique = f"{name}_{count}"
        names.append(unique)
    return tuple(names)


class ResumableSampler(DistributedSampler):
    """Serves one epoch of the training stream to one rank, starting where the stream stopped.

    Rank ``r`` of ``W`` yields stream indices ``r + j * W`` for ``j = s / W, s / W + 1, ...``,
    ``len(self)`` of them, where ``s`` is the number of samples all ranks consumed before
    (``start_fn()``; without one, ``epoch * W * len(self)`` as set by ``set_epoch``). ``len``
    counts whole batches only, so every batch is full and all ranks take the same number of steps.

    It subclasses ``DistributedSampler`` only so that Lightning leaves it in place instead of
    wrapping the loader in a shuffling sampler of its own.

    Args:
        dataset: the training windows; ``len(dataset)`` is the epoch size of the whole stream.
        batch_size: per-rank batch size.
        num_replicas: number of ranks ``W``.
        rank: this rank.
        start_fn: returns the samples consumed before a pass; called once when a pass starts.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        start_fn: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True
        )
        global_batch = batch_size * num_replicas
        self.batch_size = batch_size
        epoch = len(cast(Sized, dataset))  # a map-style dataset with a length, as torch's own
        self.num_samples = epoch // global_batch * batch_size  # per rank
        self.total_size = self.num_samples * num_replicas
        self.start_fn = start_fn

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        start = self.start_fn() if self.start_fn is not None else self.epoch * self.total_size
        if start % self.num_replicas:
            raise RuntimeError(
                f"Cannot resume the stream at sample {start} on {self.num_replicas} ranks: it is "
                f"not a multiple of the number of ranks. Resume with the global batch size of "
                f"the checkpointed run."
            )
        first = start // self.num_replicas
        for j in range(first, first + self.num_samples):
            yield self.rank + j * self.num_replicas
