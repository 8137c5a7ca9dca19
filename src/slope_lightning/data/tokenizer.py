"""Byte-level BPE tokenizers (HF ``tokenizers``): trained once on the training split and cached,
or loaded from a user's ``tokenizer.json``.

Byte-level means every string encodes (no unknown token) and decoding is exact, as in GPT-2.

A cached tokenizer is a folder ``tokenizers/bpe<size>-<key>/`` holding ``tokenizer.json`` and,
written after it, ``meta.json`` (size, sha256 and vocabulary size of the tokenizer file). The
tokenizer is trusted only when it matches that record; one without a record was never finished
and is trained again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from slope_lightning.data.artifacts import FileRecord, check_file, corrupt, read_meta, write_meta
from slope_lightning.data.corpus import Document, fingerprint
from slope_lightning.utils import atomic_write, sha256_text

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
# Separators tried, in order, in a user tokenizer; the first one in its vocabulary is used.
_SEPARATOR_CANDIDATES = (EOT_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# 256 byte symbols plus the end-of-text token: the smallest byte-level vocabulary.
MIN_VOCAB_SIZE = 257
# Bumped when the training recipe changes, so old cached tokenizers are not reused.
_RECIPE_VERSION = "bpe-bytelevel-v1"
_META_FIELDS = {"version": str, "bytes": int, "sha256": str, "vocab_size": int}


def tokenizer_cache_path(
    documents: Sequence[Document], vocab_size: int, cache_dir: str | Path
) -> Path:
    """Where :func:`train_tokenizer` caches the tokenizer for these documents and size."""
    key = sha256_text(f"{_RECIPE_VERSION}|{vocab_size}|{fingerprint(documents)}")
    return Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key[:16]}" / "tokenizer.json"


def _meta_path(path: Path) -> Path:
    """The record of a cached tokenizer: ``meta.json`` in the same folder."""
    return path.with_name("meta.json")


def _rebuild_hint(path: Path) -> str:
    """The fix every error about a cached tokenizer ends with."""
    return (
        f"Delete {path.parent} and run again: the tokenizer is trained again from the corpus "
        f"(and its token files are rebuilt)."
    )


def _checked_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta.json`` of a cached tokenizer once the file matches it; None without one."""
    meta_path = _meta_path(path)
    if not meta_path.is_file():
        return None
    fix = _rebuild_hint(path)
    meta = read_meta(meta_path, _META_FIELDS, fix)
    if meta["version"] != _RECIPE_VERSION:
        raise corrupt(
            meta_path, f"recorded by recipe {meta['version']!r}, expected {_RECIPE_VERSION!r}", fix
        )
    check_file(path, FileRecord(size=meta["bytes"], sha256=meta["sha256"]), meta_path, fix)
    return meta


def cached_tokenizer_record(path: str | Path) -> FileRecord | None:
    """Check a tokenizer cached by :func:`train_tokenizer` against its ``meta.json``.

    Returns:
        The tokenizer file's record (its sha256 identifies the tokenizer in the token cache),
        or None when the tokenizer is not cached or its writing never finished (no
        ``meta.json``).

    Raises:
        CorruptCacheError: ``meta.json`` is unreadable, or the tokenizer file is missing or its
            size or sha256 differ from the record; the message says which folder to delete.
    """
    meta = _checked_meta(Path(path))
    return None if meta is None else FileRecord(size=meta["bytes"], sha256=meta["sha256"])


def _load_cached(path: Path, meta: dict[str, Any]) -> Tokenizer:
    """Load a tokenizer whose file matched ``meta``; its vocabulary must be the recorded one."""
    tokenizer = load_tokenizer(path)
    if tokenizer.get_vocab_size() != meta["vocab_size"]:
        raise corrupt(
            path,
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, but {_meta_path(path)} "
            f"records {meta['vocab_size']}",
            _rebuild_hint(path),
        )
    return tokenizer


def _save_cached(tokenizer: Tokenizer, path: Path) -> None:
    """Write ``tokenizer.json``, then its ``meta.json``, each atomically: a crash in between
    leaves a tokenizer without a record, which is trained again rather than trusted."""
    text = tokenizer.to_str()
    atomic_write(path, text)
    meta = {
        "version": _RECIPE_VERSION,
        "bytes": len(text.encode()),
        "sha256": sha256_text(text),  # the digest of exactly the bytes written
        "vocab_size": tokenizer.get_vocab_size(),
    }
    write_meta(_meta_path(path), meta)


def train_tokenizer(
    documents: Sequence[Document], vocab_size: int, cache_dir: str | Path | None = None
) -> Tokenizer:
    """Train a byte-level BPE on ``documents`` (pass the training split only), or load it from
    the cache when these documents and this size were trained before.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (id 0) and learned merges; a
    small corpus can end with fewer than ``vocab_size`` tokens (``get_vocab_size()`` tells).

    Args:
        documents: training documents.
        vocab_size: requested vocabulary size, at least 257.
        cache_dir: cache root (the file goes to :func:`tokenizer_cache_path`); None: no cache.

    Raises:
        ValueError: ``vocab_size`` below 257, or no documents.
        CorruptCacheError: the cached tokenizer does not match its recorded size and checksum.

    Example:
        >>> tok = train_tokenizer(train_docs, 8192, ".cache/slope_lightning")  # doctest: +SKIP
        >>> tok.decode(tok.encode("To be, or not to be").ids)  # doctest: +SKIP
        'To be, or not to be'
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN}), "
            f"got {vocab_size}."
        )
    if not documents:
        raise ValueError("Cannot train a tokenizer on no documents.")
    path = tokenizer_cache_path(documents, vocab_size, cache_dir) if cache_dir else None
    if path is not None:
        meta = _checked_meta(path)
        if meta is not None:
            log.info("Loading cached tokenizer %s", path)
            return _load_cached(path, meta)
        if path.is_file():
            log.warning(
                "%s has no %s (its writing was interrupted, or an older version wrote it): "
                "training the tokenizer again",
                path,
                _meta_path(path).name,
            )

    log.info(
        "Training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(documents)
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((doc.text for doc in documents), trainer, length=len(documents))
    if tokenizer.get_vocab_size() < vocab_size:
        log.warning(
            "The corpus supports only %d of the %d requested tokens; ids stay below %d.",
            tokenizer.get_vocab_size(),
            vocab_size,
            vocab_size,
        )
    if path is not None:
        _save_cached(tokenizer, path)
        log.info("Cached tokenizer at %s", path)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by HF ``tokenizers``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file {str(path)!r} does not exist.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(
            f"{path} is not a valid tokenizer.json: {error}. Pass a file written by HF "
            f"tokenizers (`Tokenizer.save`), or leave `tokenizer_path` unset to train a BPE."
        ) from error


def separator_id(tokenizer: Tokenizer) -> int | None:
    """Id of the token put between documents: ``<|endoftext|>`` or a common end-of-sequence
    token of a user tokenizer; None when it has none (documents are then simply concatenated)."""
    for token in _SEPARATOR_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
