"""Integrity of the data cache: every cached artifact (the trained tokenizer, the token files,
their ``meta.json``) is checked against its recorded metadata when it is opened, and a
mismatch stops the run with an error that names the file, what is wrong and the fix. Writes are
atomic with the metadata last, so an interrupted write is rebuilt, never trusted.

Each case corrupts a copy of one small cache built once per module (no network)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slope_lightning.data import CorruptCacheError, TextDataModule
from slope_lightning.data import prepare as prepare_module
from slope_lightning.data import tokenizer as tokenizer_module
from slope_lightning.utils import sha256_file
from test_data import _datamodule, _ready, _write_corpus

VOCAB = 320  # _datamodule's vocab_size: the bound every token id must stay below


@dataclass(frozen=True)
class Cache:
    """A copy of the prepared cache in ``root / "cache"``, for one test to damage."""

    root: Path
    corpus: str

    @property
    def tokens_dir(self) -> Path:
        (folder,) = (self.root / "cache" / "tokens").iterdir()
        return folder

    @property
    def meta_file(self) -> Path:
        return self.tokens_dir / "meta.json"

    def bin(self, split: str) -> Path:
        return self.tokens_dir / f"{split}.bin"

    @property
    def tokenizer_file(self) -> Path:
        (folder,) = (self.root / "cache" / "tokenizers").iterdir()
        return folder / "tokenizer.json"

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_file.read_text())

    def edit_meta(self, **fields: Any) -> None:
        self.meta_file.write_text(json.dumps({**self.meta(), **fields}))

    def module(self) -> TextDataModule:
        return _datamodule(self.root, self.corpus)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, torch.Tensor]:
    """One prepared cache per module, and the first training batch read from it."""
    root = tmp_path_factory.mktemp("pristine")
    corpus = str(_write_corpus(root / "corpus") / "*.txt")
    dm = _ready(_datamodule(root, corpus))
    return root, corpus, next(iter(dm.train_dataloader()))[0]


@pytest.fixture
def cache(pristine: tuple[Path, str, torch.Tensor], tmp_path: Path) -> Cache:
    root, corpus, _ = pristine
    shutil.copytree(root / "cache", tmp_path / "cache")
    return Cache(tmp_path, corpus)


def _open(cache: Cache, stage: str) -> None:
    """Open the cache as a run does: ``prepare_data`` on rank 0, or ``setup`` on every rank."""
    dm = cache.module()
    if stage == "prepare_data":
        dm.prepare_data()
    else:
        dm.setup("fit")


def _assert_actionable(error: pytest.ExceptionInfo[BaseException], path: Path, fix: Path) -> None:
    """The message names the damaged file and says which folder to delete to rebuild it."""
    message = str(error.value)
    assert str(path) in message, message
    assert f"Delete {fix} and run again" in message, message


STAGES = pytest.mark.parametrize("stage", ["prepare_data", "setup"])


# ---------------------------------------------------------------------------------------------
# Token files against meta.json
# ---------------------------------------------------------------------------------------------


@STAGES
def test_ids_beyond_the_vocabulary(cache: Cache, stage: str) -> None:
    ids = np.fromfile(cache.bin("train"), dtype=np.uint16)
    ids[7] = VOCAB + 5  # same size: without the check, an IndexError deep in the embedding
    ids.tofile(cache.bin("train"))
    with pytest.raises(CorruptCacheError, match=f"token id {VOCAB + 5}") as error:
        _open(cache, stage)
    _assert_actionable(error, cache.bin("train"), cache.tokens_dir)
    assert f"vocabulary has {VOCAB} tokens" in str(error.value)


def test_ids_beyond_the_vocabulary_with_a_matching_meta(cache: Cache) -> None:
    """A hand-made file recorded consistently in meta.json is refused all the same."""
    ids = np.fromfile(cache.bin("val"), dtype=np.uint16)
    ids[0] = 60_000
    ids.tofile(cache.bin("val"))
    cache.edit_meta(val_max_id=60_000, val_sha256=sha256_file(cache.bin("val")))
    with pytest.raises(CorruptCacheError, match="token id 60000") as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.bin("val"), cache.tokens_dir)


@STAGES
def test_truncated_token_file(cache: Cache, stage: str) -> None:
    data = cache.bin("train").read_bytes()
    cache.bin("train").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCacheError, match="truncated") as error:
        _open(cache, stage)
    _assert_actionable(error, cache.bin("train"), cache.tokens_dir)
    assert f"{len(data) // 2} bytes" in str(error.value)


@pytest.mark.parametrize("extra", [1, 2, 4096])
def test_extra_bytes_appended(cache: Cache, extra: int) -> None:
    with cache.bin("val").open("ab") as f:
        f.write(b"\x00" * extra)
    with pytest.raises(CorruptCacheError, match="extra bytes appended") as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.bin("val"), cache.tokens_dir)


@STAGES
def test_bytes_changed_in_place(cache: Cache, stage: str) -> None:
    """Same size, every id valid, largest id unchanged: only the checksum can tell."""
    ids = np.fromfile(cache.bin("train"), dtype=np.uint16)
    other = int(np.flatnonzero(ids != ids[0])[0])
    ids[[0, other]] = ids[[other, 0]]  # a swap keeps the size and the largest id
    ids.tofile(cache.bin("train"))
    with pytest.raises(CorruptCacheError, match="sha256") as error:
        _open(cache, stage)
    _assert_actionable(error, cache.bin("train"), cache.tokens_dir)


def test_missing_token_file(cache: Cache) -> None:
    cache.bin("val").unlink()
    with pytest.raises(CorruptCacheError, match="the file is missing") as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.bin("val"), cache.tokens_dir)


def test_largest_id_differs_from_the_record(cache: Cache) -> None:
    cache.edit_meta(train_max_id=cache.meta()["train_max_id"] - 1)
    with pytest.raises(CorruptCacheError, match="largest token id") as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.bin("train"), cache.tokens_dir)


# ---------------------------------------------------------------------------------------------
# meta.json of the token files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dtype": "uint32"}, "it records dtype 'uint32'"),
        ({"dtype": "float64"}, "it records dtype 'float64'"),
        ({"train_tokens": 17}, "it records 17 train tokens of uint16"),
        ({"val_bytes": 10}, "but 10 bytes for val.bin"),
        ({"tokenizer_vocab_size": VOCAB + 1}, f"a tokenizer of {VOCAB + 1} tokens"),
        ({"tokenizer_sha256": "0" * 64}, "these files belong to the tokenizer"),
        ({"version": "tokens-v1"}, "its version is 'tokens-v1'"),
        ({"train_tokens": "many"}, "no valid 'train_tokens' field"),
        ({"val_max_id": True}, "no valid 'val_max_id' field"),
        ({"val_spans": "all"}, "no valid 'val_spans' field"),
        ({"val_spans": [[0, 5, 0]]}, "its val_spans cover 5 tokens"),
        (
            {"train_spans": [[1, 5, 0]]},
            r"train_spans do not tile the train tokens in order: \[1, 5, 0\]",
        ),
        ({"train_spans": [[0, 5, 0, 1]]}, "train_spans do not tile"),
        ({"val_spans": [[0, 5, True]]}, "val_spans do not tile"),
        ({"val_spans": [[0, 5, 1]]}, "its val_spans name source 1, but val_sources lists 1"),
        ({"val_sources": [3]}, "its val_sources are not all strings"),
    ],
)
def test_wrong_or_inconsistent_meta(cache: Cache, fields: dict[str, Any], message: str) -> None:
    cache.edit_meta(**fields)
    with pytest.raises(CorruptCacheError, match=message) as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.meta_file, cache.tokens_dir)


def test_size_and_count_edited_together_still_disagree_with_the_file(cache: Cache) -> None:
    meta = cache.meta()
    cache.edit_meta(train_tokens=meta["train_tokens"] + 1, train_bytes=meta["train_bytes"] + 2)
    with pytest.raises(CorruptCacheError, match="truncated") as error:
        _open(cache, "setup")
    _assert_actionable(error, cache.bin("train"), cache.tokens_dir)


def test_meta_missing_a_field(cache: Cache) -> None:
    meta = cache.meta()
    del meta["train_sha256"]
    cache.meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match="no valid 'train_sha256' field") as error:
        _open(cache, "prepare_data")
    _assert_actionable(error, cache.meta_file, cache.tokens_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"version": "tokens-v2", "dtype": ', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2, 3]", "a JSON list, not an object"),
        ("\udcff", "not valid JSON"),
    ],
)
@STAGES
def test_corrupt_meta_json(cache: Cache, stage: str, text: str, message: str) -> None:
    cache.meta_file.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CorruptCacheError, match=message) as error:
        _open(cache, stage)
    _assert_actionable(error, cache.meta_file, cache.tokens_dir)


def test_missing_meta_json_is_rebuilt_by_prepare_data(
    cache: Cache, pristine: tuple[Path, str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    """Without meta.json the folder was never finished: `setup` says so and what to run;
    `prepare_data` rebuilds it, saying so in a log line, and the data is the same."""
    cache.meta_file.unlink()
    cache.bin("train").write_bytes(b"\x01\x00" * 10)  # a leftover that must not be trusted
    with pytest.raises(RuntimeError, match=r"Call `prepare_data\(\)` first") as error:
        _open(cache, "setup")
    assert str(cache.meta_file) in str(error.value)
    with caplog.at_level(logging.WARNING, logger=prepare_module.__name__):
        dm = _ready(cache.module())
    assert any("rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    assert torch.equal(next(iter(dm.train_dataloader()))[0], pristine[2])


# ---------------------------------------------------------------------------------------------
# The cached tokenizer against its meta.json
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda text: "{not json", id="garbage"),
        pytest.param(lambda text: text[: len(text) // 3], id="truncated"),
        pytest.param(lambda text: text.replace('"1":17', '"1":71', 1), id="same-size-edit"),
    ],
)
@STAGES
def test_corrupt_cached_tokenizer(cache: Cache, stage: str, damage: Callable[[str], str]) -> None:
    path = cache.tokenizer_file
    text = path.read_text()
    assert damage(text) != text
    path.write_text(damage(text))
    with pytest.raises(CorruptCacheError) as error:
        _open(cache, stage)
    _assert_actionable(error, path, path.parent)
    assert "trained again" in str(error.value)


@pytest.mark.parametrize(
    "meta_text",
    [
        "{",
        '{"version": "bpe-bytelevel-v1"}',
        '{"version": "x", "bytes": 1, "sha256": "", "vocab_size": 1}',
    ],
)
def test_corrupt_tokenizer_meta(cache: Cache, meta_text: str) -> None:
    meta_path = cache.tokenizer_file.with_name("meta.json")
    meta_path.write_text(meta_text)
    with pytest.raises(CorruptCacheError) as error:
        _open(cache, "prepare_data")
    _assert_actionable(error, meta_path, cache.tokenizer_file.parent)


def test_user_tokenizer_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ')
    with pytest.raises(ValueError, match="not a valid tokenizer.json") as error:
        TextDataModule(tokenizer_path=str(path))
    assert str(path) in str(error.value) and "Tokenizer.save" in str(error.value)


# ---------------------------------------------------------------------------------------------
# The fix the messages give works, and interrupted writes are rebuilt
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["train.bin", "meta.json", "tokenizer.json"])
def test_deleting_the_named_folder_rebuilds_the_same_data(
    cache: Cache, pristine: tuple[Path, str, torch.Tensor], target: str
) -> None:
    damaged = cache.tokenizer_file if target == "tokenizer.json" else cache.tokens_dir / target
    damaged.write_bytes(damaged.read_bytes()[:-3])
    with pytest.raises(CorruptCacheError) as error:
        _open(cache, "prepare_data")
    folder = Path(str(error.value).split("Delete ", 1)[1].split(" and run again", 1)[0])
    shutil.rmtree(folder)
    dm = _ready(cache.module())
    assert torch.equal(next(iter(dm.train_dataloader()))[0], pristine[2])


def test_interrupted_tokenizer_write_is_trained_again(
    tmp_path: Path,
    pristine: tuple[Path, str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A crash after tokenizer.json but before its meta.json: the next run does not trust the
    unrecorded file, trains it again (saying so) and ends with the same data."""
    _, corpus, first_batch = pristine

    def crash(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_module, "write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(tmp_path, corpus).prepare_data()
    (tokenizer_dir,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert [p.name for p in tokenizer_dir.iterdir()] == ["tokenizer.json"]
    with pytest.raises(RuntimeError, match=r"call `prepare_data\(\)` first"):
        _datamodule(tmp_path, corpus).setup("fit")

    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger=tokenizer_module.__name__):
        dm = _ready(_datamodule(tmp_path, corpus))
    assert any("training the tokenizer again" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["meta.json", "tokenizer.json"]
    assert torch.equal(next(iter(dm.train_dataloader()))[0], first_batch)


def test_interrupted_meta_write_leaves_the_token_folder_unfinished(
    tmp_path: Path, pristine: tuple[Path, str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token files are complete but meta.json never got written: the folder is not trusted,
    and no temporary file is left behind."""
    _, corpus, first_batch = pristine

    def crash(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(tmp_path, corpus).prepare_data()
    (tokens_dir,) = (tmp_path / "cache" / "tokens").iterdir()
    assert sorted(p.name for p in tokens_dir.iterdir()) == ["test.bin", "train.bin", "val.bin"]
    with pytest.raises(RuntimeError, match="meta.json does not exist"):
        _datamodule(tmp_path, corpus).setup("fit")

    monkeypatch.undo()
    dm = _ready(_datamodule(tmp_path, corpus))
    assert torch.equal(next(iter(dm.train_dataloader()))[0], first_batch)


def test_meta_records_what_was_written(cache: Cache) -> None:
    meta = cache.meta()
    for split in ("train", "val"):
        # one `sources` entry: one source, one span over the whole file
        assert meta[f"{split}_sources"] == [cache.corpus]
        assert meta[f"{split}_spans"] == [[0, meta[f"{split}_tokens"], 0]]
        path = cache.bin(split)
        ids = np.fromfile(path, dtype=np.uint16)
        assert meta[f"{split}_bytes"] == path.stat().st_size == 2 * meta[f"{split}_tokens"]
        assert meta[f"{split}_max_id"] == int(ids.max()) < VOCAB
        assert meta[f"{split}_sha256"] == sha256_file(path)
    assert meta["tokenizer_sha256"] == sha256_file(cache.tokenizer_file)
    tokenizer_meta = json.loads(cache.tokenizer_file.with_name("meta.json").read_text())
    assert tokenizer_meta["sha256"] == sha256_file(cache.tokenizer_file)
    assert tokenizer_meta["bytes"] == cache.tokenizer_file.stat().st_size
