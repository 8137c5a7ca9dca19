"""How a SparseLinear runs its GEMMs: one interface, several backends.

- ``names``: :class:`BackendName`, the one list of backend names.
- ``base``: :class:`SparseBackend` (the interface), :class:`SparseWeight` (the weight
  operand) and :class:`OperandCache` (a layer's kernel-side copies).
- ``reference``: plain torch, any device, dtype and N:M.
- ``ops``: every call into torch's private 2:4 operators (cuSPARSELt, CUTLASS) and their
  emulation.
- ``semi_structured``: 2:4 GEMMs on any of those ops, with padding and row tiling.
- ``auto`` / ``store``: the measured per-layer choice and where decisions are kept.
"""

from __future__ import annotations

import torch

from slope_lightning.sparse.backends.auto import AutoBackend, Decision
from slope_lightning.sparse.backends.base import OperandCache, SparseBackend, SparseWeight
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.backends.ops import make_ops, token_bucket
from slope_lightning.sparse.backends.reference import ReferenceBackend
from slope_lightning.sparse.backends.semi_structured import SemiStructuredBackend, row_tiles
from slope_lightning.sparse.backends.store import DecisionStore

__all__ = [
    "AutoBackend",
    "BackendName",
    "Decision",
    "DecisionStore",
    "OperandCache",
    "ReferenceBackend",
    "SemiStructuredBackend",
    "SparseBackend",
    "SparseWeight",
    "make_backend",
    "resolve_backend",
    "row_tiles",
    "token_bucket",
]


def make_backend(name: str | BackendName) -> SparseBackend:
    """A new backend called ``name``, without checking the machine (see :func:`resolve_backend`).

    Raises:
        ValueError: an unknown name (the message lists the choices).
    """
    backend = BackendName.parse(name)
    if backend is BackendName.reference:
        return ReferenceBackend()
    if backend is BackendName.auto:
        cusparselt = make_ops("cusparselt")
        return AutoBackend(
            [
                SemiStructuredBackend(cusparselt),
                SemiStructuredBackend(cusparselt, tiled=True),
                SemiStructuredBackend(make_ops("cutlass")),
            ]
        )
    ops_name = backend.value.removesuffix("_tiled")
    return SemiStructuredBackend(make_ops(ops_name), tiled=backend.tiled)


def resolve_backend(
    backend: str | BackendName | SparseBackend, device: torch.device | None = None
) -> SparseBackend:
    """The backend ``backend`` names (an instance is returned as it is), or a clear error.

    Raises:
        ValueError: an unknown name.
        RuntimeError: a GPU backend on a machine without CUDA or for a layer not on CUDA.
    """
    if isinstance(backend, SparseBackend):
        return backend
    name = BackendName.parse(backend)
    if name.needs_cuda and (
        not torch.cuda.is_available() or (device is not None and device.type != "cuda")
    ):
        where = (
            "this machine has no CUDA GPU"
            if not torch.cuda.is_available()
            else f"the layer is on {device}"
        )
        raise RuntimeError(
            f"backend {name.value!r} runs 2:4 sparse GEMMs on a CUDA GPU, but {where}; use "
            "backend='reference' (plain torch, any device), 'emulated' (the GPU backends' "
            "logic in plain torch, for tests) or move the model to CUDA"
        )
    return make_backend(name)
