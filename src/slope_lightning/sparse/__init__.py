"""The SLoPe method in plain PyTorch (no Lightning): N:M masks, packed storage, SparseLinear
with the double-pruned backward, lazy low-rank adapters, sparsify() and memory accounting,
Wanda masks for pretrained weights, and loading a dense checkpoint into a sparse model.

Every conversion selects its layers through one plan (``selection.plan_layers``: every rule,
once, with its reason) and swaps them with one function (``selection.swap_layers``)."""

from slope_lightning.sparse.adapters import LowRankAdapter
from slope_lightning.sparse.backends import (
    BackendName,
    DecisionStore,
    ReferenceBackend,
    SparseBackend,
    resolve_backend,
)
from slope_lightning.sparse.calibration import (
    calibrate_and_sparsify,
    collect_input_norms,
    wanda_sparsify,
)
from slope_lightning.sparse.config import SparsityConfig
from slope_lightning.sparse.dense_rows import DenseRows, SafetensorsRows, StateDictRows
from slope_lightning.sparse.dtensor import local_part
from slope_lightning.sparse.kernel_ops import KernelChoices
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.linear import SparseLinear, TransposeMaskRefresh
from slope_lightning.sparse.masks import MASK_METHODS, MaskMethod, nm_mask, nm_positions
from slope_lightning.sparse.memory import MemoryReport, memory_report
from slope_lightning.sparse.operations import (
    add_adapters,
    backend_report,
    densify,
    follow_optimizer,
    load_dense_safetensors,
    load_dense_state_dict,
    merge_for_inference,
    prune_dense_state_dict,
    sparse_layers,
    unmerge,
    use_decision_store,
)
from slope_lightning.sparse.selection import (
    DEFAULT_EXCLUDE,
    LayerDecision,
    LayerRules,
    NothingSparsifiedError,
    SparsifyReport,
    plan_layers,
    swap_layers,
)
from slope_lightning.sparse.sparsify import sparsify

__all__ = [
    "DEFAULT_EXCLUDE",
    "MASK_METHODS",
    "BackendName",
    "DecisionStore",
    "DenseRows",
    "KernelChoices",
    "LayerDecision",
    "LayerRules",
    "LowRankAdapter",
    "MaskMethod",
    "MemoryReport",
    "NMLayout",
    "NothingSparsifiedError",
    "ReferenceBackend",
    "SafetensorsRows",
    "SparseBackend",
    "SparseLinear",
    "SparsifyReport",
    "SparsityConfig",
    "StateDictRows",
    "TransposeMaskRefresh",
    "add_adapters",
    "backend_report",
    "calibrate_and_sparsify",
    "collect_input_norms",
    "densify",
    "follow_optimizer",
    "load_dense_safetensors",
    "load_dense_state_dict",
    "local_part",
    "memory_report",
    "merge_for_inference",
    "nm_mask",
    "nm_positions",
    "plan_layers",
    "prune_dense_state_dict",
    "resolve_backend",
    "sparse_layers",
    "sparsify",
    "swap_layers",
    "unmerge",
    "use_decision_store",
    "wanda_sparsify",
]
