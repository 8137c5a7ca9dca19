"""Data for SLoPe pretraining, in three layers of which only the last imports Lightning:

* preparation (``corpus``, ``tokenizer``, ``prepare``): text → split by document → tokenizer →
  token files cached on disk and checked against their metadata (``artifacts``) when opened;
* streams (``streams``): memory-mapped token windows, the resumable per-rank sampler, and the
  stratified validation windows (every source, a fixed seeded order);
* ``TextDataModule`` (``datamodule``): the LightningDataModule over both, loaded on first use
  (PEP 562), so ``import slope_lightning.data`` does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slope_lightning.data.artifacts import CorruptCacheError
from slope_lightning.data.corpus import (
    DEFAULT_ARCHIVES,
    Document,
    PinnedArchive,
    fingerprint,
    load_default_corpus,
    load_documents,
    split_documents,
    split_documents_with_test,
)
from slope_lightning.data.prepare import (
    PreparedTokens,
    TokenSettings,
    find_tokenizer,
    prepare_tokens,
)
from slope_lightning.data.streams import (
    ConsecutiveWindows,
    RandomWindows,
    ResumableSampler,
    TokenFile,
    ValidationWindows,
    source_metric_names,
)
from slope_lightning.data.tokenizer import EOT_TOKEN, load_tokenizer, train_tokenizer
from slope_lightning.utils import lazy_attribute

if TYPE_CHECKING:
    from slope_lightning.data.datamodule import TextDataModule

# Names that need Lightning: imported from their module on first access.
_LAZY = {"TextDataModule": "slope_lightning.data.datamodule"}

__all__ = [
    "DEFAULT_ARCHIVES",
    "EOT_TOKEN",
    "ConsecutiveWindows",
    "CorruptCacheError",
    "Document",
    "PinnedArchive",
    "PreparedTokens",
    "RandomWindows",
    "ResumableSampler",
    "TextDataModule",
    "TokenFile",
    "TokenSettings",
    "ValidationWindows",
    "find_tokenizer",
    "fingerprint",
    "load_default_corpus",
    "load_documents",
    "load_tokenizer",
    "prepare_tokens",
    "source_metric_names",
    "split_documents",
    "split_documents_with_test",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
