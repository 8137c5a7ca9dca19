"""The preparation pipeline: corpus → split by document → tokenizer → token files, cached under
``cache_dir`` and checked against their metadata whenever they are opened. No Lightning.

The token cache of one corpus split and tokenizer is a folder ``tokens/<key>/``:

* ``train.bin``, ``val.bin``, ``test.bin``: the token ids of each split's documents, each
  document followed by the tokenizer's end-of-text token, as flat ``uint16`` (vocabularies up
  to 2**16) or ``uint32``; ``test.bin`` is empty without a test split (``test_fraction = 0``);
* ``meta.json``, written last: dtype, token and document counts, per file its byte size,
  largest id and sha256, and per split where each source's documents lie: the source labels
  (``{split}_sources``, in order of first appearance) and the token spans
  ``[start, end, source index]`` of consecutive documents of one source (``{split}_spans``,
  covering the file from 0 to its token count). So every window's source is known without
  reading the text again (per-source validation perplexity).

Every file is written under a temporary name and renamed when complete, and ``meta.json``
marks the folder as complete: a crash mid-write never leaves a folder that later looks valid,
and a folder without ``meta.json`` is rebuilt. On every open the files are checked against
``meta.json`` (size, then largest id against the vocabulary, then checksum), so a truncated,
extended or overwritten file stops the run with the file's name and the fix, before training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slope_lightning.data.artifacts import (
    FileRecord,
    check_checksum,
    check_size,
    corrupt,
    read_meta,
    write_meta,
)
from slope_lightning.data.corpus import (
    Document,
    fingerprint,
    load_default_corpus,
    load_documents,
    source_fingerprint,
    split_documents_with_test,
)
from slope_lightning.data.tokenizer import (
    cached_tokenizer_record,
    load_tokenizer,
    separator_id,
    tokenizer_cache_path,
    train_tokenizer,
)
from slope_lightning.utils import atomic_path, sha256_file, sha256_text

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 512  # documents per `encode_batch` call: parallel in Rust, bounded memory
# Bumped when the layout of train.bin / val.bin / meta.json changes (v2: meta.json records each
# file's size, largest id and sha256; v3: and each split's sources and their token spans; v4:
# and a test split, test.bin), so folders of another layout are never read.
_CACHE_VERSION = "tokens-v4"
SPLITS = ("train", "val", "test")
_COUNTS = ("tokens", "documents", "bytes", "max_id")  # recorded per split, with its sha256
_META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "version": str,
    "dtype": str,
    "tokenizer": str,
    "tokenizer_sha256": str,
    "tokenizer_vocab_size": int,
    **{f"{split}_{field}": int for split in SPLITS for field in _COUNTS},
    **{f"{split}_sha256": str for split in SPLITS},
    **{f"{split}_{field}": list for split in SPLITS for field in ("sources", "spans")},
}

#: A run of consecutive documents of one source in a token file: tokens [start, end) and the
#: index of the source in the split's source list.
Span = tuple[int, int, int]


@dataclass(frozen=True)
class PreparedTokens:
    """Where the prepared data lives, and its ``meta.json`` (checked against the files).

    Args:
        tokenizer_file: the tokenizer the token ids come from.
        tokens_dir: the folder with ``train.bin``, ``val.bin``, ``test.bin`` and ``meta.json``.
        meta: the contents of ``meta.json``.
    """

    tokenizer_file: Path
    tokens_dir: Path
    meta: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the token files."""
        return np.dtype(self.meta["dtype"])

    def token_file(self, split: str) -> Path:
        """The token file of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return self.tokens_dir / f"{split}.bin"

    def sources(self, split: str) -> tuple[str, ...]:
        """The source labels of ``split``'s documents, in order of first appearance."""
        return tuple(self.meta[f"{split}_sources"])

    def spans(self, split: str) -> list[Span]:
        """Where each source's documents lie in ``split``'s token file: ``(start, end, source
        index)`` runs, in file order, covering every token once."""
        return [(int(a), int(b), int(c)) for a, b, c in self.meta[f"{split}_spans"]]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``: half the disk and
    page cache of ``uint32`` for every vocabulary up to 2**16."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class TokenSettings:
    """The data settings that decide a run's tokenizer and token files: what
    :func:`prepare_tokens` builds from and :func:`find_tokenizer` finds again. The fields are
    ``TextDataModule``'s arguments of the same names, with its defaults.

    Attributes:
        sources: the user's text sources (see :func:`load_documents`); None for the default
            corpus.
        cache_dir: cache root: archives, tokenizers and token files live below it.
        tokenizer_path: a user ``tokenizer.json``; None to train (or reuse) a BPE.
        vocab_size: the model's vocabulary: the BPE's requested size, and the bound every
            token id must stay below.
        val_fraction: share of documents held out for validation.
        seed: seed of the split.
        text_key: field holding the text in ``.jsonl`` records.
        test_fraction: share of documents held out for testing, carved from what would
            otherwise be training documents (see :func:`split_documents_with_test`); 0 for
            none, which gives exactly the train and validation splits of before.
    """

    sources: Sequence[str | Path] | None = None
    cache_dir: str | Path = ".cache/slope_lightning"
    tokenizer_path: str | Path | None = None
    vocab_size: int = 8192
    val_fraction: float = 0.05
    seed: int = 1234
    text_key: str = "text"
    test_fraction: float = 0.0


def prepare_tokens(settings: TokenSettings, *, build: bool) -> PreparedTokens:
    """Find (and with ``build``, create) the tokenizer and token files for these settings,
    and check them against their metadata.

    Args:
        settings: the data settings; the default corpus's archives are fetched only with
            ``build``.
        build: train the tokenizer and tokenize when not cached (rank 0); False only looks.

    Raises:
        RuntimeError: without ``build``, the tokenizer or the token files are not built yet.
        CorruptCacheError: a cached file does not match its metadata (the message names the
            file, what is wrong and which folder to delete).
        ValueError: the tokenizer has more tokens than ``settings.vocab_size``.
        FileNotFoundError: ``settings.tokenizer_path`` or a text source does not exist.
    """
    cache_dir, vocab_size = Path(settings.cache_dir), settings.vocab_size
    train_docs, val_docs, test_docs = _split_corpus(settings, download=build)
    # The tokenizer is trained on the training split only: it never sees a test document.
    tokenizer_file, tokenizer_sha = _tokenizer(
        train_docs, cache_dir, settings.tokenizer_path, vocab_size, build
    )
    # The source labels are not in the text's fingerprint (they label it), but the recorded
    # spans depend on them: the same files listed as other `sources` entries get a new folder.
    key = sha256_text(
        "|".join(
            (
                _CACHE_VERSION,
                fingerprint(train_docs),
                fingerprint(val_docs),
                fingerprint(test_docs),
                tokenizer_sha,
                source_fingerprint([*train_docs, *val_docs, *test_docs]),
            )
        )
    )
    tokens_dir = cache_dir / "tokens" / key[:16]
    meta_file = tokens_dir / "meta.json"
    if build and not meta_file.is_file():
        if any((tokens_dir / f"{split}.bin").exists() for split in SPLITS):
            log.warning(
                "%s holds token files but no meta.json (an earlier run was interrupted while "
                "writing them): rebuilding them",
                tokens_dir,
            )
        splits = {"train": train_docs, "val": val_docs, "test": test_docs}
        _write_tokens(tokens_dir, tokenizer_file, tokenizer_sha, splits, vocab_size)
    if not meta_file.is_file():
        raise RuntimeError(
            f"{meta_file} does not exist: the token files for this corpus and tokenizer are not "
            f"built, or their writing was interrupted. Call `prepare_data()` first (the Trainer "
            f"does so on rank 0 before `setup`); it builds them."
        )
    meta = _open_token_cache(tokens_dir, tokenizer_sha, vocab_size)
    return PreparedTokens(tokenizer_file, tokens_dir, meta)


def find_tokenizer(settings: TokenSettings) -> Path:
    """The ``tokenizer.json`` that a run with these data settings used, found again without
    building anything (e.g. to decode a trained model's samples).

    With ``settings.tokenizer_path`` that file; otherwise the BPE that :func:`prepare_tokens`
    trained on the training split and cached: the corpus is read again (the default corpus
    from its cached archives, never downloaded) and split as the run split it, which gives
    the cache key. Relative paths are taken from the current directory, as the run took them.

    Args:
        settings: the run's data settings.

    Raises:
        FileNotFoundError: the tokenizer, a text source or a corpus archive is not there
            (the message names it), or the tokenizer was never cached for these settings.
        CorruptCacheError: the cached tokenizer does not match its recorded checksum.
        ValueError: the sources hold no text.
    """
    if settings.tokenizer_path is not None:
        return _user_tokenizer(settings.tokenizer_path)
    train_docs, _, _ = _split_corpus(settings, download=False)
    tokenizer_file = tokenizer_cache_path(train_docs, settings.vocab_size, settings.cache_dir)
    if cached_tokenizer_record(tokenizer_file) is None:
        raise FileNotFoundError(
            f"No cached tokenizer at {tokenizer_file} for these data settings (its cache was "
            "deleted, or the text sources changed since the run)."
        )
    return tokenizer_file


def _split_corpus(
    settings: TokenSettings, *, download: bool
) -> tuple[list[Document], list[Document], list[Document]]:
    """The train, validation and test documents of the settings' sources (None: the default
    corpus, its archives fetched only with ``download``)."""
    if settings.sources is None:
        documents = load_default_corpus(Path(settings.cache_dir), download=download)
    else:
        documents = load_documents(settings.sources, text_key=settings.text_key)
    # The default corpus mixes sources; validation should hold some of each.
    return split_documents_with_test(
        documents,
        settings.val_fraction,
        settings.test_fraction,
        settings.seed,
        stratify=settings.sources is None,
    )


def _user_tokenizer(tokenizer_path: str | Path) -> Path:
    """A user's ``tokenizer.json``, which must exist."""
    tokenizer_file = Path(tokenizer_path)
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"Tokenizer file {str(tokenizer_file)!r} does not exist.")
    return tokenizer_file


def _tokenizer(
    train_docs: Sequence[Document],
    cache_dir: Path,
    tokenizer_path: str | Path | None,
    vocab_size: int,
    build: bool,
) -> tuple[Path, str]:
    """The tokenizer file for this run and its sha256, training the BPE with ``build``."""
    if tokenizer_path is not None:
        tokenizer_file = _user_tokenizer(tokenizer_path)
        # A user's file has no record of ours: its digest keys the token cache, so token files
        # made from an earlier version of it are never reused.
        return tokenizer_file, sha256_file(tokenizer_file)
    tokenizer_file = tokenizer_cache_path(train_docs, vocab_size, cache_dir)
    if build:
        train_tokenizer(train_docs, vocab_size, cache_dir)
    record = cached_tokenizer_record(tokenizer_file)
    if record is None:
        raise RuntimeError(
            f"No tokenizer at {tokenizer_file}: call `prepare_data()` first (the Trainer does so "
            f"on rank 0 before `setup`)."
        )
    return tokenizer_file, record.sha256


def _rebuild_hint(tokens_dir: Path) -> str:
    """The fix every error about a token folder ends with."""
    return f"Delete {tokens_dir} and run again: `prepare_data()` rebuilds the token files."


def _open_token_cache(tokens_dir: Path, tokenizer_sha: str, vocab_size: int) -> dict[str, Any]:
    """Read ``meta.json`` and check both token files against it; return the metadata.

    Per file: the size (a truncated or extended file), then the largest id (an id the model's
    embedding cannot look up), then the sha256 (bytes changed in place). Hashing reads each
    file once: about 6 MB, some milliseconds, for the default corpus.

    Raises:
        CorruptCacheError: a field is missing or inconsistent, or a file does not match.
    """
    meta_file = tokens_dir / "meta.json"
    fix = _rebuild_hint(tokens_dir)
    meta = read_meta(meta_file, _META_FIELDS, fix)
    if meta["version"] != _CACHE_VERSION:
        raise corrupt(
            meta_file, f"its version is {meta['version']!r}, expected {_CACHE_VERSION!r}", fix
        )
    if meta["tokenizer_sha256"] != tokenizer_sha:
        raise corrupt(
            meta_file,
            f"it records tokenizer sha256 {meta['tokenizer_sha256']}, but these files belong "
            f"to the tokenizer with sha256 {tokenizer_sha}",
            fix,
        )
    tokenizer_vocab = meta["tokenizer_vocab_size"]
    if not 0 < tokenizer_vocab <= vocab_size:
        raise corrupt(
            meta_file,
            f"it records a tokenizer of {tokenizer_vocab} tokens, but the vocabulary has "
            f"{vocab_size}",
            fix,
        )
    dtype = token_dtype(tokenizer_vocab)
    if meta["dtype"] != dtype.name:
        raise corrupt(
            meta_file,
            f"it records dtype {meta['dtype']!r}, but ids of a {tokenizer_vocab}-token "
            f"vocabulary are stored as {dtype.name!r}",
            fix,
        )
    for split in SPLITS:
        path = tokens_dir / f"{split}.bin"
        tokens, size = meta[f"{split}_tokens"], meta[f"{split}_bytes"]
        if size != tokens * dtype.itemsize:
            raise corrupt(
                meta_file,
                f"it records {tokens} {split} tokens of {dtype.name} ({dtype.itemsize} bytes "
                f"each) but {size} bytes for {path.name}",
                fix,
            )
        check_size(path, size, meta_file, fix)
        max_id = _max_id(path, dtype)
        if max_id >= vocab_size:
            raise corrupt(
                path,
                f"it holds token id {max_id}, but the vocabulary has {vocab_size} tokens (ids "
                f"0 to {vocab_size - 1}); the model's embedding cannot look it up",
                fix,
            )
        if max_id != meta[f"{split}_max_id"]:
            raise corrupt(
                path,
                f"its largest token id is {max_id}, but {meta_file} records "
                f"{meta[f'{split}_max_id']}",
                fix,
            )
        check_checksum(path, meta[f"{split}_sha256"], meta_file, fix)
        _check_spans(meta, split, meta_file, fix)
    return meta


def _check_spans(meta: dict[str, Any], split: str, meta_file: Path, fix: str) -> None:
    """Raise unless ``{split}_sources`` / ``{split}_spans`` describe the file: labels are
    strings, spans are ``[start, end, index]`` runs that tile ``[0, tokens)`` in order."""
    sources, spans = meta[f"{split}_sources"], meta[f"{split}_spans"]
    if not all(isinstance(label, str) for label in sources):
        raise corrupt(meta_file, f"its {split}_sources are not all strings ({sources!r})", fix)
    position = 0
    for span in spans:
        valid = (
            isinstance(span, list)
            and len(span) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        )
        if not valid or span[0] != position or span[1] <= span[0]:
            raise corrupt(
                meta_file,
                f"its {split}_spans do not tile the {split} tokens in order: {span!r} after "
                f"token {position}",
                fix,
            )
        if not 0 <= span[2] < len(sources):
            raise corrupt(
                meta_file,
                f"its {split}_spans name source {span[2]}, but {split}_sources lists "
                f"{len(sources)}",
                fix,
            )
        position = span[1]
    if position != meta[f"{split}_tokens"]:
        raise corrupt(
            meta_file,
            f"its {split}_spans cover {position} tokens, but it records "
            f"{meta[f'{split}_tokens']} {split} tokens",
            fix,
        )


def _max_id(path: Path, dtype: np.dtype) -> int:
    """Largest token id in a token file, -1 for an empty one (one pass over a memory map)."""
    if path.stat().st_size == 0:
        return -1  # np.memmap cannot map an empty file
    return int(np.memmap(path, dtype=dtype, mode="r").max())


def _write_tokens(
    tokens_dir: Path,
    tokenizer_file: Path,
    tokenizer_sha: str,
    splits: Mapping[str, Sequence[Document]],
    vocab_size: int,
) -> None:
    """Tokenize each split (``SPLITS``) into ``<split>.bin``, then write ``meta.json``.

    Each file is written under a temporary name and renamed when complete, and ``meta.json``,
    which marks the folder as ready, comes last: an interrupted run leaves no file that looks
    complete.
    """
    tokenizer = load_tokenizer(tokenizer_file)
    actual_vocab = tokenizer.get_vocab_size()
    if actual_vocab > vocab_size:
        raise ValueError(
            f"{tokenizer_file} has {actual_vocab} tokens, more than vocab_size = {vocab_size}."
        )
    dtype = token_dtype(actual_vocab)
    separator = separator_id(tokenizer)
    if separator is None:
        log.warning(
            "%s has no end-of-text token; documents are concatenated without one.",
            tokenizer_file,
        )
    tokens_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "version": _CACHE_VERSION,
        "dtype": dtype.name,
        "tokenizer": str(tokenizer_file),
        "tokenizer_sha256": tokenizer_sha,
        "tokenizer_vocab_size": actual_vocab,
    }
    for split in SPLITS:
        docs = splits[split]
        log.info("Tokenizing %d %s documents into %s", len(docs), split, tokens_dir)
        lengths, max_id, record = _encode_to_file(
            tokenizer, docs, separator, dtype, tokens_dir / f"{split}.bin"
        )
        sources, spans = source_spans(docs, lengths)
        meta[f"{split}_tokens"] = sum(lengths)
        meta[f"{split}_documents"] = len(docs)
        meta[f"{split}_bytes"] = record.size
        meta[f"{split}_max_id"] = max_id
        meta[f"{split}_sha256"] = record.sha256
        meta[f"{split}_sources"] = sources
        meta[f"{split}_spans"] = [list(span) for span in spans]
    write_meta(tokens_dir / "meta.json", meta)
    log.info(
        "Wrote %d train, %d validation and %d test tokens (%s) to %s",
        meta["train_tokens"],
        meta["val_tokens"],
        meta["test_tokens"],
        dtype.name,
        tokens_dir,
    )


def source_spans(
    documents: Sequence[Document], lengths: Sequence[int]
) -> tuple[list[str], list[Span]]:
    """The source labels of ``documents`` (in order of first appearance) and the token spans
    of runs of consecutive documents from one source, given each document's token count.

    Documents of no tokens add nothing; the spans tile ``[0, sum(lengths))``.

    Example:
        >>> docs = [Document("a/1", "x", "a"), Document("a/2", "y", "a"), Document("b/1", "z", "b")]
        >>> source_spans(docs, [3, 2, 4])
        (['a', 'b'], [(0, 5, 0), (5, 9, 1)])
    """
    sources: list[str] = []
    spans: list[Span] = []
    position = 0
    for document, length in zip(documents, lengths, strict=True):
        if length == 0:
            continue
        if document.source not in sources:
            sources.append(document.source)
        index = sources.index(document.source)
        if spans and spans[-1][2] == index:
            spans[-1] = (spans[-1][0], position + length, index)
        else:
            spans.append((position, position + length, index))
        position += length
    return sources, spans


def _encode_to_file(
    tokenizer: Any,
    documents: Sequence[Document],
    separator: int | None,
    dtype: np.dtype,
    path: Path,
) -> tuple[list[int], int, FileRecord]:
    """Write the ids of ``documents``, each followed by ``separator``, to ``path`` atomically.

    Returns:
        Each document's number of tokens, the largest id (-1 for none) and the file's record.
    """
    lengths: list[int] = []
    max_id = -1
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            for start in range(0, len(documents), _ENCODE_CHUNK):
                chunk = documents[start : start + _ENCODE_CHUNK]
                encodings = tokenizer.encode_batch(
                    [doc.text for doc in chunk], add_special_tokens=False
                )
                for encoding in encodings:
                    ids = encoding.ids if separator is None else [*encoding.ids, separator]
                    np.asarray(ids, dtype=dtype).tofile(f)
                    lengths.append(len(ids))
                    if ids:
                        max_id = max(max_id, max(ids))
        record = FileRecord.of(tmp)  # measured before the rename: the bytes that get published
    return lengths, max_id, record
