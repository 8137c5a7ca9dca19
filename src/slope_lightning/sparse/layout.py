"""The N:M layout of one sparse weight: shapes, packing and transient dense views.

A weight W of shape (rows, cols) pruned N:M along cols is stored as
``values`` (rows, cols·N/M) plus ``index``, the packed offsets (see ``packing.py``).
The same layout describes a SparseLinear weight (rows = d_out, cols = d_in), its
double-pruned transpose (rows = d_in, cols = d_out) and an adapter's Lᵀ (rows = r, cols = d_in).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from slope_lightning.sparse.masks import (
    MaskMethod,
    check_nm,
    nm_positions,
    positions_to_columns,
)
from slope_lightning.sparse.packing import (
    bits_per_offset,
    pack_positions,
    unpack_positions,
)


def check_divisible(name: str, sizes: dict[str, int], m: int, by: str, fix: str) -> None:
    """Raise a ValueError naming layer ``name`` unless ``m`` divides every one of ``sizes``
    (label -> size; ``by`` names m in the message, ``fix`` says what to do)."""
    for label, size in sizes.items():
        if size % m:
            raise ValueError(f"layer {name!r}: {label}={size} is not divisible by {by}; {fix}")


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
        tables = byte_tables(self.n, self.m, index.device)
        if tables is None:
            return positions_to_columns(self.positions(index), self.m)
        columns = F.embedding(index.long(), tables[1])  # (rows, W, per_byte)
        span = tables[0].shape[1]  # columns covered by one byte
        columns += torch.arange(index.shape[1], device=index.device)[:, None] * span
        return columns.view(self.rows, -1)[:, : self.kept_per_row]

    def to_dense(self, values: Tensor, index: Tensor, columns: Tensor | None = None) -> Tensor:
        """Dense (rows, cols) tensor with zeros at pruned positions. Transient use only.

        ``columns`` may pass in :meth:`columns` of ``index`` when the caller already has it.
        """
        out = values.new_zeros(self.rows, self.cols)
        if columns is None and byte_tables(self.n, self.m, index.device) is not None:
            # Kept values are stored in row-major column order, the order masked_scatter_
            # fills True entries in; cheaper than building int64 column indices.
            return out.masked_scatter_(self.mask(index), values)
        columns = self.columns(index) if columns is None else columns
        return out.scatter_(1, columns, values)

    def mask(self, index: Tensor) -> Tensor:
        """Dense boolean (rows, cols) mask of kept positions. Transient use only."""
        tables = byte_tables(self.n, self.m, index.device)
        if tables is not None:
            mask = F.embedding(index.long(), tables[0])  # (rows, W, span)
            return mask.view(self.rows, -1)[:, : self.cols].bool()
        out = torch.zeros(self.rows, self.cols, dtype=torch.bool, device=index.device)
        return out.scatter_(1, self.columns(index), True)

    def gather(self, dense: Tensor, index: Tensor, columns: Tensor | None = None) -> Tensor:
        """Entries of a dense (rows, cols) tensor at the kept positions: (rows, cols·N/M)."""
        return dense.gather(1, self.columns(index) if columns is None else columns)

    def transposed(self) -> NMLayout:
        """Layout of the transpose pruned along the other dimension (for M_C)."""
        return NMLayout(self.cols, self.rows, self.n, self.m)


@lru_cache(maxsize=64)
def byte_tables(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """Per-byte lookup tables decoding packed offsets, for patterns whose bytes hold whole
    groups (2:4, 1:4, 2:8...); None for the others (decoded by bit arithmetic).

    Row b of the first table is the uint8 mask of the columns that byte value b covers; row
    b of the second, the kept columns relative to the byte's first column. Decoding a packed
    index is then one table lookup per byte, which matters on the hot path (every forward
    and backward).

    The one cache of the tables, per (n, m, device), for the process: built once and copied
    to a device once, so no training or decode step pays a host-to-device copy for them.
    Tables are a pure function of (n, m); callers must not write to them.
    """
    bits = bits_per_offset(m)
    per_byte = 8 // bits
    if per_byte % n:
        return None
    if device.type != "cpu":
        cpu = byte_tables(n, m, torch.device("cpu"))
        assert cpu is not None
        return cpu[0].to(device), cpu[1].to(device)
    with torch.device("cpu"):  # the CPU tables, also when built under a meta default device
        return _cpu_byte_tables(n, m, bits, per_byte)


def _cpu_byte_tables(n: int, m: int, bits: int, per_byte: int) -> tuple[Tensor, Tensor]:
    """:func:`byte_tables` on the CPU (``bits`` per offset, ``per_byte`` offsets a byte)."""
    groups_per_byte = per_byte // n
    byte = torch.arange(256)
    offsets = torch.stack([(byte >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], -1)
    offsets = offsets.view(256, groups_per_byte, n)  # (256, groups, n)
    invalid = (offsets >= m).any(-1).any(-1)
    offsets = offsets.masked_fill(invalid[:, None, None], 0)  # bytes that never occur
    starts = torch.arange(groups_per_byte)[:, None] * m
    columns = (offsets + starts).view(256, per_byte)  # (256, per_byte)
    mask = torch.zeros(256, groups_per_byte * m, dtype=torch.uint8)
    mask.scatter_(1, columns, 1)
    return mask, columns
