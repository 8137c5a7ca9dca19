"""The N:M layout of one sparse weight: shapes, packing and transient dense views.

A weight W of shape (rows, cols) pruned N:M along cols is stored as
``values`` (rows, cols·N/M) plus ``index``, the packed offsets (see ``packing.py``).
The same layout describes a SparseLinear weight (rows = d_out, cols = d_in), its
double-pruned transpose (rows = d_in, cols = d_out) and an adapter's Lᵀ (rows = r, cols = d_in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slope_lightning.sparse.masks import (
    MaskMethod,
    check_nm,
    nm_positions,
    positions_to_columns,
)
from slope_lightning.sparse.packing import pack_positions, packed_width, unpack_positions


@dataclass(frozen=True)
class NMLayout:
    """Shape and N:M pattern of a (rows, cols) weight pruned along cols."""

    rows: int
    cols: int
    n: int
    m: int

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        if self.cols % self.m != 0:
            raise ValueError(f"{self.cols} columns are not divisible by m={self.m}")

    @property
    def kept_per_row(self) -> int:
        return self.cols // self.m * self.n

    @property
    def groups_per_row(self) -> int:
        return self.cols // self.m

    @property
    def index_width(self) -> int:
        """Bytes of packed offsets per row."""
        return packed_width(self.kept_per_row, self.m)

    def stacked(self, other: NMLayout) -> NMLayout:
        """Layout of ``self``'s rows followed by ``other``'s (same cols and pattern)."""
        if (other.cols, other.n, other.m) != (self.cols, self.n, self.m):
            raise ValueError(f"cannot stack {other} under {self}: cols and N:M must match")
        return NMLayout(self.rows + other.rows, self.cols, self.n, self.m)

    def prune(
        self,
        dense: Tensor,
        method: MaskMethod = "magnitude",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prune a dense (rows, cols) tensor: returns (values, packed index)."""
        if tuple(dense.shape) != (self.rows, self.cols):
            raise ValueError(f"expected shape {(self.rows, self.cols)}, got {tuple(dense.shape)}")
        positions = nm_positions(dense, self.n, self.m, method, generator)  # (rows, G, n)
        columns = positions_to_columns(positions, self.m)  # (rows, cols*n/m)
        return dense.gather(1, columns), pack_positions(positions, self.m)

    def positions(self, index: Tensor) -> Tensor:
        """Kept offsets (rows, G, n) from the packed index."""
        return unpack_positions(index, self.m, self.groups_per_row, self.n)

    def columns(self, index: Tensor) -> Tensor:
        """Absolute column of every kept value, (rows, cols·N/M) int64."""
        return positions_to_columns(self.positions(index), self.m)

    def to_dense(self, values: Tensor, index: Tensor) -> Tensor:
        """Dense (rows, cols) tensor with zeros at pruned positions. Transient use only."""
        out = values.new_zeros(self.rows, self.cols)
        return out.scatter(1, self.columns(index), values)

    def mask(self, index: Tensor) -> Tensor:
        """Dense boolean (rows, cols) mask of kept positions. Transient use only."""
        out = torch.zeros(self.rows, self.cols, dtype=torch.bool, device=index.device)
        return out.scatter_(1, self.columns(index), True)

    def gather(self, dense: Tensor, index: Tensor) -> Tensor:
        """Entries of a dense (rows, cols) tensor at the kept positions: (rows, cols·N/M)."""
        return dense.gather(1, self.columns(index))

    def transposed(self) -> NMLayout:
        """Layout of the transpose pruned along the other dimension (for M_C)."""
        return NMLayout(self.cols, self.rows, self.n, self.m)
