"""Data for SLoPe pretraining: corpora, byte-level BPE tokenizers and ``TextDataModule``."""

from slope_lightning.data.corpus import (
    DEFAULT_ARCHIVES,
    Document,
    PinnedArchive,
    fingerprint,
    load_default_corpus,
    load_documents,
    split_documents,
)
from slope_lightning.data.datamodule import TextDataModule
from slope_lightning.data.tokenizer import EOT_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "DEFAULT_ARCHIVES",
    "EOT_TOKEN",
    "Document",
    "PinnedArchive",
    "TextDataModule",
    "fingerprint",
    "load_default_corpus",
    "load_documents",
    "load_tokenizer",
    "split_documents",
    "train_tokenizer",
]
