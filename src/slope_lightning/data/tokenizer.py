"""Byte-level BPE tokenizers (HF ``tokenizers``): trained once on the training split and cached,
or loaded from a user's ``tokenizer.json``.

Byte-level means every string encodes (no unknown token) and decoding is exact, as in GPT-2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from slope_lightning.data.corpus import Document, fingerprint

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
# Separators tried, in order, in a user tokenizer; the first one in its vocabulary is used.
_SEPARATOR_CANDIDATES = (EOT_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# 256 byte symbols plus the end-of-text token: the smallest byte-level vocabulary.
MIN_VOCAB_SIZE = 257
# Bumped when the training recipe changes, so old cached tokenizers are not reused.
_RECIPE_VERSION = "bpe-bytelevel-v1"


def tokenizer_cache_path(
    documents: Sequence[Document], vocab_size: int, cache_dir: str | Path
) -> Path:
    """Where :func:`train_tokenizer` caches the tokenizer for these documents and size."""
    key = hashlib.sha256(
        f"{_RECIPE_VERSION}|{vocab_size}|{fingerprint(documents)}".encode()
    ).hexdigest()
    return Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key[:16]}" / "tokenizer.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if path is not None and path.is_file():
        log.info("Loading cached tokenizer %s", path)
        return load_tokenizer(path)

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
        atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))
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
        raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error


def separator_id(tokenizer: Tokenizer) -> int | None:
    """Id of the token put between documents: ``<|endoftext|>`` or a common end-of-sequence
    token of a user tokenizer; None when it has none (documents are then simply concatenated)."""
    for token in _SEPARATOR_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
