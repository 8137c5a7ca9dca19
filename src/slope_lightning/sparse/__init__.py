"""The SLoPe method in plain PyTorch (no Lightning): N:M masks, packed storage, SparseLinear
with the double-pruned backward, lazy low-rank adapters, sparsify() and memory accounting."""

from slope_lightning.sparse.adapters import LowRankAdapter
from slope_lightning.sparse.backends import (
    BackendName,
    DecisionStore,
    ReferenceBackend,
    SparseBackend,
    resolve_backend,
)
from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.sparse.kernel_ops import KernelChoices
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.linear import SparseLinear, TransposeMaskRefresh
from slope_lightning.sparse.masks import nm_mask, nm_positions
from slope_lightning.sparse.memory import MemoryReport, memory_report
from slope_lightning.sparse.sparsify import (
    DEFAULT_EXCLUDE,
    LayerDecision,
    SparsifyReport,
    add_adapters,
    backend_report,
    densify,
    follow_optimizer,
    merge_for_inference,
    sparse_layers,
    sparsify,
    unmerge,
    use_decision_store,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "BackendName",
    "DecisionStore",
    "KernelChoices",
    "LayerDecision",
    "LowRankAdapter",
    "MemoryReport",
    "NMLayout",
    "ReferenceBackend",
    "SparseBackend",
    "SparseLinear",
    "SparsifyReport",
    "SparsityConfig",
    "TransposeMaskRefresh",
    "add_adapters",
    "backend_report",
    "densify",
    "follow_optimizer",
    "memory_report",
    "merge_for_inference",
    "nm_mask",
    "nm_positions",
    "resolve_backend",
    "sparse_layers",
    "sparsify",
    "unmerge",
    "use_decision_store",
]
