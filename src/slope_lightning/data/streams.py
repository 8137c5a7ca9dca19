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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from pathlib import Path
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
