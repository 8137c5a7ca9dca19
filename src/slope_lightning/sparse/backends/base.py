"""Backends: how a SparseLinear computes its three GEMMs.

Every backend implements the same three operations on 2-D operands; the layer owns the
packed weight and any cache a backend derives from it. ``reference`` is plain torch and runs
anywhere; it builds the dense W_R (and W_RC in the backward) transiently, one layer at a time.
GPU backends (``cusparselt``, ``cutlass``, ``auto``) plug in behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from slope_lightning.sparse.kernel_ops import KernelChoices, gather_grad
from slope_lightning.sparse.layout import NMLayout

BackendName = Literal[
    "reference", "cusparselt", "cusparselt+tiled", "cutlass", "cutlass+tiled", "auto"
]
#: "+tiled": tall operands cut into square row tiles (the paper's tiling), always on.
GPU_BACKENDS: tuple[str, ...] = (
    "cusparselt",
    "cusparselt+tiled",
    "cutlass",
    "cutlass+tiled",
    "auto",
)
KNOWN_BACKENDS: tuple[str, ...] = ("reference", *GPU_BACKENDS)


class OperandCache:
    """Kernel-side copies of one layer's weight (e.g. compressed W_R and W_RCᵀ).

    Each entry is rebuilt only when its key changes: the key names the parameter version
    (bumped by every optimizer step) and the transposed-mask generation (bumped by every
    refresh of M_C). Owned by the layer, never shared, never global.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Hashable, Any]] = {}
        self.builds = 0  # how many times an operand was (re)built: setup work, not per call

    def get(self, name: str, key: Hashable, build: Callable[[], Any]) -> Any:
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = build()
        self._entries[name] = (key, value)
        self.builds += 1
        return value

    def clear(self) -> None:
        self._entries.clear()

    def tensors(self) -> list[Tensor]:
        """Every tensor held, for memory accounting."""
        found: list[Tensor] = []

        def collect(value: Any) -> None:
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, tuple | list):
                for item in value:
                    collect(item)

        for _, value in self._entries.values():
            collect(value)
        return found


class SparseBackend(ABC):
    """The three GEMMs of a SLoPe linear layer, on 2-D operands.

    ``layout`` describes W (d_out, d_in) pruned along d_in; ``row_index`` is M_R and
    ``col_index`` is M_C (packed, for Wᵀ pruned along d_out). ``cache`` and ``key`` let a
    backend keep derived operands across calls (``key`` changes whenever they must be rebuilt).

    Args:
        kernels: which steps run as Triton kernels instead of torch compositions (default:
            none; ``auto`` sets them from measurements, see ``sparse.kernel_ops``).
    """

    name: str
    #: Class default (torch everywhere), so a subclass that never calls this __init__ works.
    kernels: KernelChoices = KernelChoices()

    def __init__(self, kernels: KernelChoices | None = None) -> None:
        if kernels is not None:
            self.kernels = kernels

    def unsupported(self, layout: NMLayout, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot run the layer, or None if it can."""
        return None

    @abstractmethod
    def forward(
        self,
        x: Tensor,
        values: Tensor,
        row_index: Tensor,
        bias: Tensor | None,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        """Y = X W_Rᵀ + b for X of shape (T, d_in); returns (T, d_out)."""

    @abstractmethod
    def grad_input(
        self,
        grad_out: Tensor,
        values: Tensor,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        """dX = dY W_RC for dY of shape (T, d_out); returns (T, d_in)."""

    def grad_values(
        self, grad_out: Tensor, x: Tensor, row_index: Tensor, layout: NMLayout
    ) -> Tensor:
        """(dYᵀ X) at M_R's positions; returns (d_out, d_in·N/M). A dense GEMM everywhere."""
        grad_weight = grad_out.t() @ x  # (d_out, d_in): the dense GEMM of the method
        return gather_grad(grad_weight, row_index, layout, self.kernels.gather_grad)


def double_pruned_transpose(
    values: Tensor, row_index: Tensor, col_index: Tensor, layout: NMLayout
) -> Tensor:
    """W_RCᵀ = (W_R ⊙ M_C)ᵀ as a dense contiguous (d_in, d_out) tensor. Transient use only."""
    weight_t = layout.to_dense(values, row_index).t().contiguous()  # (d_in, d_out)
    keep_t = layout.transposed().mask(col_index)  # M_C as (d_in, d_out)
    return weight_t.masked_fill_(~keep_t, 0)


class ReferenceBackend(SparseBackend):
    """Plain torch on any device and dtype, any N:M: dense tensors only inside one call."""

    name = "reference"

    def forward(
        self,
        x: Tensor,
        values: Tensor,
        row_index: Tensor,
        bias: Tensor | None,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        weight = layout.to_dense(values, row_index)  # (d_out, d_in), transient
        return F.linear(x, weight, bias)

    def grad_input(
        self,
        grad_out: Tensor,
        values: Tensor,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        cache: OperandCache | None = None,
        key: Hashable = None,
    ) -> Tensor:
        weight = layout.to_dense(values, row_index)  # W_R (d_out, d_in), transient
        # M_C is stored for W_Rᵀ's rows; one bool transpose is far cheaper than a strided
        # in-place op on the float weight.
        keep = layout.transposed().mask(col_index).t().contiguous()  # (d_out, d_in) bool
        weight.masked_fill_(~keep, 0)  # W_RC = W_R ⊙ M_C
        return grad_out @ weight  # (T, d_in)


def resolve_backend(name: str, device: torch.device | None = None) -> SparseBackend:
    """Return the backend called ``name`` for ``device``, or raise a clear error."""
    if name == "reference":
        return ReferenceBackend()
    if name in GPU_BACKENDS:
        if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
            where = (
                "this machine has no CUDA GPU"
                if not torch.cuda.is_available()
                else f"the layer is on {device}"
            )
            raise RuntimeError(
                f"backend {name!r} runs 2:4 sparse GEMMs on a CUDA GPU, but {where}; "
                "use backend='reference' (plain torch, any device) or move the model to CUDA"
            )
        from slope_lightning.sparse.gpu import make_gpu_backend

        return make_gpu_backend(name)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(KNOWN_BACKENDS)}")
