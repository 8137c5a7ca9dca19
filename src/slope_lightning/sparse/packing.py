"""Compact storage of N:M mask positions: a few bits per kept value.

Each kept value's offset inside its group of M needs ceil(log2 M) bits; we round that up to
1, 2, 4 or 8 so that offsets never straddle a byte. 2:4 therefore costs 2 bits per kept
value (one byte per four kept values), 2:8 and 4:8 cost 4 bits, and M up to 256 one byte.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bits_per_offset(m: int) -> int:
    """Bits used to store one offset in 0..m-1 (a power of two, so bytes hold whole offsets)."""
    needed = max(1, math.ceil(math.log2(m)))
    for bits in (1, 2, 4, 8):
        if needed <= bits:
            return bits
    raise ValueError(f"m={m} needs {needed} bits per offset; at most 8 are supported (m <= 256)")


def packed_width(kept_per_row: int, m: int) -> int:
    """Number of bytes per row that hold ``kept_per_row`` offsets."""
    per_byte = 8 // bits_per_offset(m)
    return -(-kept_per_row // per_byte)


def pack_positions(positions: Tensor, m: int) -> Tensor:
    """Pack offsets (R, G, n) with values in [0, m) into uint8 (R, packed_width(G*n, m))."""
    rows = positions.shape[0]
    flat = positions.reshape(rows, -1).to(torch.int32)  # (R, G*n)
    bits = bits_per_offset(m)
    per_byte = 8 // bits
    width = packed_width(flat.shape[1], m)
    padded = torch.zeros(rows, width * per_byte, dtype=torch.int32, device=positions.device)
    padded[:, : flat.shape[1]] = flat
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
    offsets = offsets.reshape(rows, -1)[:, : groups * n]
    return offsets.reshape(rows, groups, n).to(torch.int64)
