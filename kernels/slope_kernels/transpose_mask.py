"""M_C re-derived straight from the packed weight, in one pass and without a dense W_R: for
every column of W_R and every group of m consecutive rows, keep the n entries of largest |w|
(entries outside M_R count as 0, NaN as +inf, ties to the lower row), packed like M_R. This
is SLoPe's double pruning (Mozaffari et al., arXiv 2405.16325); kernel, host wrapper and
plain-torch reference after torchao's layout.

The kernel owns one output byte of a block of W_R's columns: it decodes the few groups of m
rows whose kept offsets land in that byte, ranks each group (n of m, stable), and packs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slope_kernels._triton import block_size, cdiv, check_operands, jit, tl
from slope_kernels.packed_format import (
    bits_per_offset,
    check_pattern,
    pack_positions,
    packed_width,
    unpack_columns,
)

MAX_M = 16  # the ranking compares all pairs of a group: a (BLOCK_C, m, m) tile per program


@jit
def _group_magnitudes(
    values_ptr, index_ptr, g, cols, D_OUT, D_IN, stride_v, stride_i,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, M_PAD: tl.constexpr,
):  # fmt: skip
    """|W_R[g·M + i, cols]| for i < M as a (BLOCK_C, M_PAD) tile, decoded from packed rows.

    NaN becomes +inf (never silently dropped); padding (i >= M, rows or columns out of
    range) becomes -1, below every real magnitude.
    """
    PER_BYTE: tl.constexpr = 8 // BITS
    i = tl.arange(0, M_PAD)
    rows = g * M + i  # (M_PAD,) rows of W_R
    valid = (cols[:, None] < D_IN) & (i[None, :] < M) & (rows[None, :] < D_OUT)
    within = cols % M  # position of each column inside its group along d_in
    w = tl.zeros(valid.shape, dtype=tl.float32)  # entries outside M_R are 0
    for s in tl.static_range(N):
        k = (cols // M) * N + s  # (BLOCK_C,) kept-value slot of that group in each row
        byte = tl.load(
            index_ptr + rows[None, :] * stride_i + (k // PER_BYTE)[:, None], mask=valid, other=0
        )
        offset = (byte.to(tl.int32) >> ((k % PER_BYTE) * BITS)[:, None]) & ((1 << BITS) - 1)
        v = tl.load(values_ptr + rows[None, :] * stride_v + k[:, None], mask=valid, other=0.0)
        w = tl.where(offset == within[:, None], v.to(tl.float32), w)
    a = tl.abs(w)
    a = tl.where(a != a, float("inf"), a)
    return tl.where(valid, a, -1.0)


@jit
def derive_transpose_index_kernel(
    values_ptr, index_ptr, out_ptr, D_OUT, D_IN, OUT_KEPT, stride_v, stride_i, stride_o,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, M_PAD: tl.constexpr,
    SPAN: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Byte ``program_id(0)`` of the packed M_C rows for BLOCK_C columns of W_R."""
    PER_BYTE: tl.constexpr = 8 // BITS
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # columns of W_R = rows of out
    i = tl.arange(0, M_PAD)
    first = b * PER_BYTE  # first kept slot (of a row of out) packed in this byte
    code = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for t in tl.static_range(SPAN):  # the groups whose kept slots meet this byte
        g = first // N + t
        a = _group_magnitudes(
            values_ptr, index_ptr, g, cols, D_OUT, D_IN, stride_v, stride_i, N, M, BITS, M_PAD
        )  # (BLOCK_C, M_PAD)
        # rank of entry i: entries larger, plus equal ones at a lower row (a stable sort).
        a_i = a[:, :, None]
        a_k = a[:, None, :]
        lower = i[None, None, :] < i[None, :, None]
        beats = (a_k > a_i) | ((a_k == a_i) & lower)  # (BLOCK_C, M_PAD, M_PAD)
        rank = tl.sum(beats.to(tl.int32), axis=2)
        kept = (rank < N) & (i[None, :] < M)
        order = tl.cumsum(kept.to(tl.int32), axis=1) - 1  # kept entries, ascending offsets
        for s in tl.static_range(N):
            slot = g * N + s - first  # where the group's s-th kept offset goes in this byte
            take = (slot >= 0) & (slot < PER_BYTE) & (g * N + s < OUT_KEPT)
            offset = tl.sum(tl.where(kept & (order == s), i[None, :], 0), axis=1)
            shift = tl.minimum(tl.maximum(slot, 0), PER_BYTE - 1) * BITS
            code |= tl.where(take, offset << shift, 0)
    tl.store(out_ptr + cols * stride_o + b, code.to(tl.uint8), mask=cols < D_IN)


def _span(n: int, per_byte: int) -> int:
    """Most groups of n kept slots that one byte of ``per_byte`` slots can touch."""
    return max((b * per_byte + per_byte - 1) // n - (b * per_byte) // n + 1 for b in range(n))


def derive_transpose_index(
    values: Tensor, row_index: Tensor, n: int, m: int, d_out: int, d_in: int
) -> Tensor:
    """M_C of an N:M SparseLinear, straight from its packed values and row index.

    Bit-identical to ``SparseLinear._derive_col_index()`` (and to
    ``NMLayout(d_out, d_in, n, m).transposed().prune(W_Rᵀ)[1]``): the packed offsets of W_Rᵀ
    (d_in, d_out) pruned n:m along d_out by magnitude, ties to the lower offset.

    Args:
        values: (d_out, d_in·n/m) kept values of W_R, fp32/fp16/bf16, contiguous rows.
        row_index: uint8 packed M_R of W_R (d_out, d_in), contiguous rows.
        n, m: the N:M pattern of both masks; m <= 16 (2:4 is what GPUs accelerate).
        d_out, d_in: the weight's shape; both divisible by m.

    Returns:
        uint8 (d_in, ceil(d_out·n/m / (8 // bits))): M_C packed like ``pack_positions``.

    Raises:
        ValueError: an invalid or unsupported pattern (m > 16), sizes not divisible by m,
            values or index of the wrong shape or dtype, strided rows, mixed devices.
        RuntimeError: triton is missing or the device does not fit.
    """
    name = "derive_transpose_index"
    check_pattern(name, n, m)
    if m > MAX_M:
        raise ValueError(
            f"{name}: m={m} is not supported (the kernel ranks groups of at most m={MAX_M}); "
            f"use {name}_reference"
        )
    if d_out % m or d_in % m:
        raise ValueError(f"{name}: d_out={d_out} and d_in={d_in} must both be divisible by m={m}")
    kept = d_in // m * n
    if tuple(values.shape) != (d_out, kept):
        raise ValueError(
            f"{name}: values must be (d_out, d_in·n/m) = ({d_out}, {kept}), got "
            f"{tuple(values.shape)}"
        )
    width = packed_width(kept, m)
    if row_index.dtype != torch.uint8 or tuple(row_index.shape) != (d_out, width):
        raise ValueError(
            f"{name}: row_index must be uint8 ({d_out}, {width}) for {n}:{m} along d_in={d_in}, "
            f"got {row_index.dtype} {tuple(row_index.shape)}"
        )
    # values of every float dtype compare exactly in fp32
    check_operands(name, floats=("values",), values=values, row_index=row_index)
    out_kept = d_out // m * n
    bits = bits_per_offset(m)
    out = torch.empty(d_in, packed_width(out_kept, m), dtype=torch.uint8, device=values.device)
    if out.numel() == 0:
        return out
    m_pad = 1 << (m - 1).bit_length()
    block_c = block_size(d_in, 16, max(16, 2048 // (m_pad * m_pad)))
    grid = (out.shape[1], cdiv(d_in, block_c))
    derive_transpose_index_kernel[grid](
        values, row_index, out, d_out, d_in, out_kept,
        values.stride(0), row_index.stride(0), out.stride(0),
        N=n, M=m, BITS=bits, M_PAD=m_pad, SPAN=_span(n, 8 // bits),
        BLOCK_C=block_c,
    )  # fmt: skip
    return out


def derive_transpose_index_reference(
    values: Tensor, row_index: Tensor, n: int, m: int, d_out: int, d_in: int
) -> Tensor:
    """Plain torch: build W_Rᵀ densely (transient), keep n of m per group by a stable sort,
    pack the offsets."""
    kept = d_in // m * n
    columns = unpack_columns(row_index, n, m, kept)  # (d_out, kept)
    dense_t = values.new_zeros(d_out, d_in).scatter_(1, columns, values).t()  # (d_in, d_out)
    keys = torch.nan_to_num(dense_t.abs(), nan=math.inf).reshape(d_in, d_out // m, m)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # lower offset first
    positions = torch.sort(order[..., :n], dim=-1).values  # (d_in, d_out/m, n) ascending
    return pack_positions(positions, m)
