"""slope-lightning: SLoPe 2:4 sparse pretraining for PyTorch and Lightning.

The method itself (``sparsify``, ``SparseLinear``, adapters, ``memory_report``) imports only
torch. The Lightning pieces (``SLoPeModule``, ``MaskScheduler``, ``LazyLoRA``,
``TextDataModule``) are imported on first use, so plain-PyTorch users never load Lightning.
"""

from __future__ import annotations

from typing import Any

from slope_lightning.sparse import (
    MemoryReport,
    SparseLinear,
    SparsifyReport,
    SparsityConfig,
    add_adapters,
    densify,
    follow_optimizer,
    memory_report,
    merge_for_inference,
    sparsify,
    unmerge,
)
from slope_lightning.utils import lazy_attribute

__version__ = "0.1.0"

_LAZY = {
    "SLoPeModule": "slope_lightning.module",
    "MaskScheduler": "slope_lightning.callbacks",
    "LazyLoRA": "slope_lightning.callbacks",
    "TextDataModule": "slope_lightning.data",
    "Transformer": "slope_lightning.models",
    "TransformerConfig": "slope_lightning.models",
}

__all__ = [
    "MemoryReport",
    "SparseLinear",
    "SparsifyReport",
    "SparsityConfig",
    "add_adapters",
    "densify",
    "follow_optimizer",
    "memory_report",
    "merge_for_inference",
    "sparsify",
    "unmerge",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name, globals())
