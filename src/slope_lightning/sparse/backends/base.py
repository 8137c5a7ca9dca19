"""The backend interface: how a SparseLinear computes its three GEMMs.

A backend receives the layer's weight as a :class:`SparseWeight` (packed values, masks and
the key of anything derived from them) and returns dense results; the layer owns the
weight and the :class:`OperandCache` a backend may keep derived operands in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from slope_lightning.sparse.kernel_ops import KernelChoices, gather_grad
from slope_lightning.sparse.layout import NMLayout

if TYPE_CHECKING:
    from slope_lightning.sparse.backends.store import DecisionStore


@dataclass(frozen=True)
class SparseWeight:
    """One weight operand as a backend sees it: W_R (rows, cols) pruned N:M along cols.

    Attributes:
        values: the kept values, (rows, cols·N/M), in the layer's parameter dtype.
        row_index: M_R, packed offsets of the kept values.
        layout: shape and N:M pattern.
        dtype: the compute dtype the GEMMs run in (values are cast only when a dense or
            compressed operand is built, so a cache hit costs no cast).
        col_index: M_C, packed offsets for W_Rᵀ's rows (needed by the input gradient only).
        key: identifies these values and masks; a cached operand built under another key is
            rebuilt. None: nothing may be cached (every call builds transiently).
    """

    values: Tensor
    row_index: Tensor
    layout: NMLayout
    dtype: torch.dtype
    col_index: Tensor | None = None
    key: Hashable | None = None

    def dense(self) -> Tensor:
        """W_R as a dense (rows, cols) tensor in the compute dtype. Transient use only."""
        return self.layout.to_dense(self.values.to(self.dtype), self.row_index)

    def double_pruned(self) -> Tensor:
        """W_RC = W_R ⊙ M_C as a dense (rows, cols) tensor. Transient use only."""
        weight = self.dense()  # (rows, cols)
        # M_C is stored for W_Rᵀ's rows; one bool transpose is far cheaper than a strided
        # in-place op on the float weight.
        keep = self.layout.transposed().mask(self._col_index()).t()  # (rows, cols) bool
        return weight.masked_fill_(~keep, 0)

    def double_pruned_t(self) -> Tensor:
        """W_RCᵀ as a dense contiguous (cols, rows) tensor, N:M along rows. Transient."""
        weight_t = self.dense().t().contiguous()  # (cols, rows)
        keep_t = self.layout.transposed().mask(self._col_index())  # (cols, rows)
        return weight_t.masked_fill_(~keep_t, 0)

    def _col_index(self) -> Tensor:
        if self.col_index is None:
            raise ValueError("this SparseWeight carries no M_C (col_index): forward-only operand")
        return self.col_index


class OperandCache:
    """Kernel-side copies of one layer's weight (e.g. compressed W_R and W_RCᵀ).

    Each entry is rebuilt when the :attr:`SparseWeight.key` it was built under changes.
    Owned by the layer, never shared, never global.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Hashable, Any]] = {}
        self.builds = 0  # how many times an operand was (re)built: setup work, not per call

    def get(self, name: str, key: Hashable | None, build: Callable[[], Any]) -> Any:
        """The entry ``name`` built under ``key``; built now if absent or stale.

        A ``None`` key means "do not cache": the operand is built and returned, not kept.
        """
        if key is None:
            self.builds += 1
            return build()
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        self._entries.pop(name, None)  # free the stale operand before building its successor
        value = build()
        self._entries[name] = (key, value)
        self.builds += 1
        return value

    def clear(self) -> None:
        """Drop every entry (the layer's weight is about to change)."""
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

    Subclasses implement :meth:`forward` and :meth:`grad_input`; :meth:`grad_values` is the
    same dense GEMM everywhere. Callers never ask which class they hold: what they need is a
    property or a method here.
    """

    name: str
    #: Which steps run as Triton kernels instead of torch compositions (class default: torch
    #: everywhere; see ``sparse.kernel_ops``). ``auto`` sets it from measurements.
    kernels: KernelChoices = KernelChoices()
    #: Rows of a sparse operand must be a multiple of this; the merged [W_R; Lᵀ] operand of
    #: inference is padded with zero rows to it.
    row_multiple: int = 1

    def __init__(self, kernels: KernelChoices | None = None) -> None:
        if kernels is not None:
            self.kernels = kernels

    def unsupported(self, layout: NMLayout, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot run the layer, or None if it can."""
        return None

    @abstractmethod
    def forward(
        self, x: Tensor, weight: SparseWeight, bias: Tensor | None, cache: OperandCache | None
    ) -> Tensor:
        """Y = X W_Rᵀ + b for X of shape (T, d_in); returns (T, d_out)."""

    @abstractmethod
    def grad_input(
        self, grad_out: Tensor, weight: SparseWeight, cache: OperandCache | None
    ) -> Tensor:
        """dX = dY W_RC for dY of shape (T, d_out); returns (T, d_in)."""

    def grad_values(self, grad_out: Tensor, x: Tensor, weight: SparseWeight) -> Tensor:
        """(dYᵀ X) at M_R's positions; returns (d_out, d_in·N/M). A dense GEMM everywhere."""
        grad_weight = grad_out.t() @ x  # (d_out, d_in): the dense GEMM of the method
        return gather_grad(grad_weight, weight.row_index, weight.layout, self.kernels.gather_grad)

    def use_decision_store(self, store: DecisionStore) -> None:
        """Keep measured decisions in ``store``; only a backend that measures (``auto``) has
        any, so the default does nothing."""
        return None

    @property
    def running(self) -> SparseBackend:
        """The backend whose GEMMs ran last: ``self``, or ``auto``'s latest decision."""
        return self

    def describe(self) -> str:
        """One line for reports: the name and, where any runs, the Triton kernels."""
        if "triton" in self.kernels.as_dict().values():
            return f"{self.name}; kernels {self.kernels.describe()}"
        return self.name
