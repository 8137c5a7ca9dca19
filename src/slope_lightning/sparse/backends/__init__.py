"""GEMM backends of a SparseLinear (work in progress: being split into modules)."""

from slope_lightning.sparse.backends.base import *  # noqa: F403
from slope_lightning.sparse.backends.base import (
    GPU_BACKENDS,
    KNOWN_BACKENDS,
    OperandCache,
    ReferenceBackend,
    SparseBackend,
    double_pruned_transpose,
    resolve_backend,
)
from slope_lightning.sparse.backends.names import BackendName

__all__ = [
    "GPU_BACKENDS",
    "KNOWN_BACKENDS",
    "BackendName",
    "OperandCache",
    "ReferenceBackend",
    "SparseBackend",
    "double_pruned_transpose",
    "resolve_backend",
]
