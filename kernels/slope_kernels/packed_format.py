"""The packed N:M index format: the one definition that the library and the kernels share.

A weight pruned N:M along its rows keeps n values in every group of m consecutive entries.
Its index stores, for every kept value, only the offset of that value inside its group:

- Each offset needs ceil(log2 m) bits, rounded up to 1, 2, 4 or 8 (:func:`bits_per_offset`),
  so that offsets never straddle a byte: 2:4 costs 2 bits per kept value (one byte per four
  kept values), 2:8 and 4:8 cost 4 bits, and any m up to 256 one byte.
- Kept value j of a row lies in group ``j // n`` at offset
  ``(index[row, j // P] >> (j % P)·bits) & (2**bits - 1)`` with ``P = 8 // bits`` offsets per
  byte, filled from the lowest bits up; a row's last byte is padded with zero offsets.
- Inside a group the kept offsets are stored in ascending order.

This module is torch-only and sits at the bottom of the kernels package: it imports neither
triton nor ``slope_lightning``, so ``slope_lightning.sparse`` re-exports it (as
``slope_lightning.sparse.packing``) without loading Triton, and the Triton kernels decode the
same bits that the library writes. The kernels spell the decoding formula above in Triton;
their tests compare it bit for bit with :func:`unpack_positions`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest group size the format stores: an offset must fit in one byte.
MAX_M = 256


def bits_per_offset(m: int) -> int:
    """Bits used to store one offset in 0..m-1 (a power of two, so bytes hold whole offsets).

    Raises:
        ValueError: m > 256 (an offset would not fit in one byte).
    """
    needed = max(1, math.ceil(math.log2(m)))
    for bits in (1, 2, 4, 8):
        if needed <= bits:
            return bits
    raise ValueError(f"m={m} needs {needed} bits per offset; at most 8 are supported (m <= 256)")


def packed_width(kept_per_row: int, m: int) -> int:
    """Number of bytes per row that hold ``kept_per_row`` offsets of groups of m."""
    per_byte = 8 // bits_per_offset(m)
    return -(-kept_per_row // per_byte)


def check_pattern(name: str, n: int, m: int) -> None:
    """Raise a ValueError naming ``name`` unless ``1 <= n < m <= 256`` (what the format stores).

    Raises:
        ValueError: n or m not an int, or outside ``1 <= n < m <= 256``.
    """
    if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m <= MAX_M:
        raise ValueError(f"{name}: invalid N:M pattern {n}:{m}; need 1 <= n < m <= {MAX_M}")


def pack_positions(positions: Tensor, m: int) -> Tensor:
    """Pack offsets (R, G, n) with values in [0, m) into uint8 (R, packed_width(G*n, m))."""
    rows = positions.shape[0]
    flat = positions.reshape(rows, -1).to(torch.int32)  # (R, G*n)
    bits = bits_per_offset(m)
    per_byte = 8 // bits
    width = packed_width(flat.shape[1], m)
    padded = torch.zeros(rows, width * per_byte, dtype=torch.int32, device=positions.device)
    padded[:, : flat.shape[1]] = flat  # (R, width*per_byte), zero offsets pad the last byte
    shifts = torch.arange(per_byte, device=positions.device, dtype=torch.int32) * bits
    packed = (padded.view(rows, width, per_byte) << shifts).sum(-1)  # (R, width)
    return packed.to(torch.uint8)


def unpack_positions(packed: Tensor, m: int, groups: int, n: int) -> Tensor:
    """Inverse of :func:`pack_positions`: uint8 (R, W) -> int64 offsets (R, groups, n)."""
    rows = packed.shape[0]
    bits = bits_per_offset(m)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    offsets = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask  # (R, W, per_byte)
    offsets = offsets.reshape(rows, -1)[:, : groups * n]  # (R, groups*n): padding dropped
    return offsets.reshape(rows, groups, n).to(torch.int64)


def unpack_columns(packed: Tensor, n: int, m: int, kept: int) -> Tensor:
    """Absolute column (R, kept) int64 of every kept value: group ``j // n`` times m plus the
    stored offset (``kept`` = cols·n/m, a multiple of n)."""
    groups = kept // n
    offsets = unpack_positions(packed, m, groups, n)  # (R, groups, n)
    starts = torch.arange(groups, device=packed.device).unsqueeze(-1) * m  # (groups, 1)
    return (offsets + starts).flatten(1)  # (R, kept)
