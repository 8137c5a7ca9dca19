"""Validation that samples the whole split, per source, and a data order with its own seed.

* The token cache records where each source's documents lie (``{split}_sources`` and
  ``{split}_spans`` in ``meta.json``), so every validation window's source is known.
* Validation windows never mix sources, cover every source, come in a fixed seeded order
  that depends only on the split, and any prefix of them (``limit_val_batches``) holds each
  source's share to within one window.
* The training stream's order has its own seed (``order_seed``; by default
  ``seed_everything``'s), separate from the split seed, and a resumed run keeps its
  checkpoint's order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from slope_lightning.data import (
    EOT_TOKEN,
    Document,
    TextDataModule,
    TokenFile,
    ValidationWindows,
    load_documents,
    load_tokenizer,
    source_metric_names,
    split_documents,
)
from slope_lightning.data.datamodule import GLOBAL_SEED_ENV
from slope_lightning.data.prepare import source_spans
from test_data import _datamodule, _fit, _ready, _write_corpus

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*is smaller than the logging interval.*",
)


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another test's ``seed_everything`` must not decide these tests' data order."""
    monkeypatch.delenv(GLOBAL_SEED_ENV, raising=False)


@pytest.fixture
def two_sources(tmp_path: Path) -> list[str]:
    """Two ``sources`` entries of unequal size: 30 and 10 documents."""
    big = _write_corpus(tmp_path / "big", n_docs=30, seed=1)
    small = _write_corpus(tmp_path / "small", n_docs=10, seed=2)
    return [str(big / "*.txt"), str(small / "*.txt")]


def _token_file(tmp_path: Path, count: int) -> TokenFile:
    path = tmp_path / "tokens.bin"
    np.arange(count, dtype=np.uint16).tofile(path)  # token i has id i: windows are readable
    return TokenFile(path, np.dtype(np.uint16))


# ---------------------------------------------------------------------------------------------
# Where each source lies
# ---------------------------------------------------------------------------------------------


def test_source_spans_merge_runs_and_skip_empty_documents() -> None:
    docs = [
        Document("a/1", "x", "a"),
        Document("a/2", "x", "a"),
        Document("b/1", "x", "b"),
        Document("b/2", "x", "b"),  # no tokens: adds nothing
        Document("a/3", "x", "a"),
    ]
    sources, spans = source_spans(docs, [3, 2, 4, 0, 1])
    assert sources == ["a", "b"]
    assert spans == [(0, 5, 0), (5, 9, 1), (9, 10, 0)]
    assert source_spans([], []) == ([], [])


def test_token_cache_records_each_sources_spans(tmp_path: Path, two_sources: list[str]) -> None:
    dm = _ready(_datamodule(tmp_path, "unused", sources=two_sources))
    meta = dm.summary
    tokenizer = load_tokenizer(Path(meta["tokenizer"]))
    eot = tokenizer.token_to_id(EOT_TOKEN)
    splits = split_documents(load_documents(two_sources), val_fraction=0.2, seed=1234)
    for split, docs in zip(("train", "val"), splits, strict=True):
        assert {d.source for d in docs} <= set(two_sources)
        lengths = [len(tokenizer.encode(d.text, add_special_tokens=False).ids) + 1 for d in docs]
        labels, spans = source_spans(docs, lengths)
        assert meta[f"{split}_sources"] == labels
        assert meta[f"{split}_spans"] == [list(span) for span in spans]
        assert spans[-1][1] == meta[f"{split}_tokens"]
        tokens = np.fromfile(Path(meta["tokens_dir"]) / f"{split}.bin", dtype=np.uint16)
        assert all(tokens[end - 1] == eot for _, end, _ in spans)  # spans end on a document end
    assert meta["train_sources"] == two_sources  # both sources, in input order
    # The source labels key the cache (the spans depend on them), not the text's fingerprint.
    renamed = [str(Path(s).parent / "doc_*.txt") for s in two_sources]
    other = _ready(_datamodule(tmp_path, "unused", sources=renamed))
    assert other.summary["tokens_dir"] != meta["tokens_dir"]
    assert other.summary["train_sha256"] == meta["train_sha256"]
    assert other.summary["tokenizer"] == meta["tokenizer"]  # same training text: same BPE
    assert other.summary["val_sources"] == renamed


# ---------------------------------------------------------------------------------------------
# Validation windows
# ---------------------------------------------------------------------------------------------


def test_windows_stay_inside_one_source_and_cover_every_window(tmp_path: Path) -> None:
    tokens = _token_file(tmp_path, 200)
    spans = [(0, 50, 0), (50, 83, 1), (83, 200, 0)]
    val = ValidationWindows(tokens, 8, spans, ["a", "b"], seed=0, with_source=True)
    expected = {
        0: [*range(0, 42, 8), *range(83, 192, 8)],  # starts o with o + 9 <= span end
        1: list(range(50, 75, 8)),
    }
    for index, starts in expected.items():
        assert sorted(val.offsets[val.source_ids == index].tolist()) == starts
    assert val.windows_per_source == (len(expected[0]), len(expected[1]))
    for i in range(len(val)):
        x, y, source = val[i]
        start = int(val.offsets[i])
        assert x.tolist() == list(range(start, start + 8))
        assert y.tolist() == list(range(start + 1, start + 9))
        assert source.dtype == torch.long and source.dim() == 0
        owner = next(s for a, b, s in spans if a <= start and start + 9 <= b)
        assert int(source) == owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_prefix_holds_each_sources_share(tmp_path: Path, seed: int) -> None:
    tokens = _token_file(tmp_path, 6000)
    spans = [(0, 3100, 0), (3100, 4700, 1), (4700, 6000, 2)]
    val = ValidationWindows(tokens, 10, spans, ["a", "b", "c"], seed=seed)
    counts = np.array(val.windows_per_source)
    total = counts.sum()
    for k in range(1, total + 1):
        seen = np.bincount(val.source_ids[:k], minlength=3)
        assert np.all(np.abs(seen - k * counts / total) <= 1.0), (k, seen)
    # within a source, the order is a shuffle, not file order
    first = val.offsets[val.source_ids == 0]
    assert first.tolist() != sorted(first.tolist())


def test_order_depends_only_on_the_seed(tmp_path: Path) -> None:
    tokens = _token_file(tmp_path, 1000)
    spans = [(0, 600, 0), (600, 1000, 1)]
    a = ValidationWindows(tokens, 8, spans, ["a", "b"], seed=5)
    b = ValidationWindows(tokens, 8, spans, ["a", "b"], seed=5)
    c = ValidationWindows(tokens, 8, spans, ["a", "b"], seed=6)
    assert a.offsets.tolist() == b.offsets.tolist()
    assert a.offsets.tolist() != c.offsets.tolist()
    assert sorted(a.offsets.tolist()) == sorted(c.offsets.tolist())


def test_no_window_anywhere_is_an_error(tmp_path: Path) -> None:
    tokens = _token_file(tmp_path, 16)
    with pytest.raises(ValueError, match="no source's documents hold seq_len"):
        ValidationWindows(tokens, 8, [(0, 8, 0), (8, 16, 1)], ["a", "b"], 0)


def test_source_metric_names() -> None:
    assert source_metric_names(["shakespeare", "wiki"]) == ("shakespeare", "wiki")
    assert source_metric_names(["data/notes/*.txt", "x/a.jsonl", "", "y/a.txt"]) == (
        "notes",
        "a",
        "source",
        "a_2",
    )


# ---------------------------------------------------------------------------------------------
# The data module: validation batches and the order seed
# ---------------------------------------------------------------------------------------------


def test_val_batches_carry_source_ids_when_asked(tmp_path: Path, two_sources: list[str]) -> None:
    plain = _ready(_datamodule(tmp_path, "unused", sources=two_sources))
    dm = _ready(_datamodule(tmp_path, "unused", sources=two_sources, val_source_ids=True))
    assert dm.val_source_names == plain.val_source_names == ("big", "small")
    assert dm.val_dataset is not None
    with_ids = list(dm.val_dataloader())
    without = list(plain.val_dataloader())
    ids = torch.cat([b[2] for b in with_ids])
    assert ids.tolist() == dm.val_dataset.source_ids.tolist()
    assert set(ids.tolist()) == {0, 1}
    for (x, y, source), (px, py) in zip(with_ids, without, strict=True):
        assert source.shape == (x.shape[0],)
        assert torch.equal(x, px) and torch.equal(y, py)


def test_the_module_logs_validation_perplexity_per_source(
    tmp_path: Path, two_sources: list[str]
) -> None:
    """With ``val_source_ids`` the module logs ``val/ppl/<source>`` beside ``val/ppl``; each
    is exp of that source's mean window loss, and the overall one lies between them."""
    import lightning.pytorch as pl

    from slope_lightning.module import SLoPeModule

    dm = _ready(_datamodule(tmp_path, "unused", sources=two_sources, val_source_ids=True))
    module = SLoPeModule(
        preset="tiny",
        vocab_size=dm.vocab_size,
        seq_len=dm.seq_len,
        model_overrides={"n_layer": 1, "d_model": 32, "n_head": 2, "n_kv_head": 1},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics
    per_source = [float(metrics[f"val/ppl/{name}"]) for name in ("big", "small")]
    assert min(per_source) <= float(metrics["val/ppl"]) <= max(per_source)
    # The same numbers by hand: each source's windows, their mean token loss.
    assert dm.val_dataset is not None
    losses: dict[int, list[float]] = {0: [], 1: []}
    module.eval()
    with torch.no_grad():
        for x, y, source in dm.val_dataloader():
            logits, _ = module.model(x, y)
            nll = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), reduction="none"
            )
            for window, index in zip(nll.view_as(y).mean(1), source, strict=True):
                losses[int(index)].append(float(window))
    for index, name in enumerate(("big", "small")):
        expected = float(np.exp(np.mean(losses[index])))
        assert float(metrics[f"val/ppl/{name}"]) == pytest.approx(expected, rel=1e-4)


def test_validation_windows_depend_on_the_split_seed_only(
    tmp_path: Path, two_sources: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _ready(_datamodule(tmp_path, "unused", sources=two_sources))
    monkeypatch.setenv(GLOBAL_SEED_ENV, "77")
    other_order = _ready(_datamodule(tmp_path, "unused", sources=two_sources, order_seed=3))
    assert base.val_dataset is not None and other_order.val_dataset is not None
    assert base.val_dataset.offsets.tolist() == other_order.val_dataset.offsets.tolist()
    assert base.summary["tokens_dir"] == other_order.summary["tokens_dir"]
    other_split = _ready(_datamodule(tmp_path, "unused", sources=two_sources, seed=9))
    assert other_split.summary["tokens_dir"] != base.summary["tokens_dir"]


def _first_batches(dm: TextDataModule, count: int = 3) -> list[torch.Tensor]:
    batches = iter(dm.train_dataloader())
    return [next(batches)[0] for _ in range(count)]


def test_order_seed_sets_the_stream_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = str(_write_corpus(tmp_path / "corpus") / "*.txt")
    # Without seed_everything the order seed is the split seed: the stream of earlier releases.
    default = _ready(_datamodule(tmp_path, corpus))
    assert default.data_order_seed == 1234
    same = _ready(_datamodule(tmp_path, corpus, order_seed=1234))
    assert all(
        torch.equal(a, b)
        for a, b in zip(_first_batches(default), _first_batches(same), strict=True)
    )
    seven = _ready(_datamodule(tmp_path, corpus, order_seed=7))
    assert not torch.equal(_first_batches(default)[0], _first_batches(seven)[0])
    assert seven.summary["tokens_dir"] == default.summary["tokens_dir"]  # same split, tokens
    # seed_everything's seed is the default order seed; an explicit order_seed wins over it.
    monkeypatch.setenv(GLOBAL_SEED_ENV, "7")
    derived = _ready(_datamodule(tmp_path, corpus))
    assert derived.data_order_seed == 7
    assert all(
        torch.equal(a, b)
        for a, b in zip(_first_batches(derived), _first_batches(seven), strict=True)
    )
    explicit = _ready(_datamodule(tmp_path, corpus, order_seed=1234))
    assert torch.equal(_first_batches(explicit)[0], _first_batches(default)[0])


def test_bad_order_seed_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="order_seed must be >= 0"):
        TextDataModule(order_seed=-1)
    monkeypatch.setenv(GLOBAL_SEED_ENV, "abc")
    with pytest.raises(ValueError, match="PL_GLOBAL_SEED='abc' is not an integer seed"):
        _ = TextDataModule().data_order_seed


def test_resume_keeps_the_checkpoints_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run started under seed_everything(11) and resumed where seed_everything says 12
    (e.g. ``seed_everything: true``) trains on the batches of the uninterrupted run; an
    explicit, different order_seed is honoured with a warning."""
    corpus = str(_write_corpus(tmp_path / "corpus") / "*.txt")

    def make(**overrides: object) -> TextDataModule:
        return _datamodule(tmp_path, corpus, **overrides)

    monkeypatch.setenv(GLOBAL_SEED_ENV, "11")
    full, _ = _fit(make(), 6)
    first, trainer = _fit(make(), 3)
    done = len(first.seen)
    assert first.seen == full.seen[:done]
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    (dm_state,) = [v for k, v in state.items() if k == "TextDataModule"]
    assert dm_state["order_seed"] == 11 and dm_state["seed"] == 1234

    monkeypatch.setenv(GLOBAL_SEED_ENV, "12")
    resumed, _ = _fit(make(), 6, ckpt_path=ckpt)
    assert resumed.seen == full.seen[done:]

    with caplog.at_level(logging.WARNING):
        forced, _ = _fit(make(order_seed=12), 6, ckpt_path=ckpt)
    assert "order_seed=12, but the checkpoint was made with order_seed=11" in caplog.text
    assert forced.seen != full.seen[done:]


def test_checkpoints_from_before_order_seed_resume_their_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint without ``order_seed`` drew its stream with the split seed."""
    corpus = str(_write_corpus(tmp_path / "corpus") / "*.txt")
    full, _ = _fit(_datamodule(tmp_path, corpus), 6)
    first, trainer = _fit(_datamodule(tmp_path, corpus), 3)
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["TextDataModule"]["order_seed"]
    torch.save(state, ckpt)
    monkeypatch.setenv(GLOBAL_SEED_ENV, "5")
    resumed, _ = _fit(_datamodule(tmp_path, corpus), 6, ckpt_path=ckpt)
    assert resumed.seen == full.seen[len(first.seen) :]
