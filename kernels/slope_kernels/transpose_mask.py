"""Re-derive M_C straight from the packed weight: for every column of W_R and every group of
four rows, keep the two entries of largest |w| (ties to the lower row), packed 2 bits per kept
value like M_R. One pass, no dense W_R in memory (SLoPe's double pruning, 2:4). Kernel, host
wrapper and plain-torch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import check_launchable, jit, tl
from slope_kernels.fused_lowrank import triton_cdiv


@jit
def _magnitude(values_ptr, index_ptr, row, cols, D_OUT, D_IN, stride_v, stride_i):
    """|W_R[row, cols]| (fp32, NaN as +inf) decoded from the packed row ``row``."""
    valid = (cols < D_IN) & ((cols * 0 + row) < D_OUT)
    group = cols // 4
    byte = tl.load(index_ptr + row * stride_i + group // 2, mask=valid, other=0).to(tl.int32)
    shift = 4 * (group % 2)
    off0 = (byte >> shift) & 3
    off1 = (byte >> (shift + 2)) & 3
    v0 = tl.load(values_ptr + row * stride_v + 2 * group, mask=valid, other=0.0).to(tl.float32)
    v1 = tl.load(values_ptr + row * stride_v + 2 * group + 1, mask=valid, other=0.0).to(tl.float32)
    here = cols % 4
    w = tl.where(off0 == here, v0, tl.where(off1 == here, v1, 0.0))
    w = tl.abs(w)
    return tl.where(w != w, float("inf"), w)


@jit
def _two_of_four(a0, a1, a2, a3):
    """Packed 4-bit code (lo | hi << 2) of the two largest of four, ties to the lower index."""
    r0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
    r1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
    r2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
    r3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
    k0, k1, k2, k3 = r0 < 2, r1 < 2, r2 < 2, r3 < 2
    lo = tl.where(k0, 0, tl.where(k1, 1, 2))
    hi = tl.where(k3, 3, tl.where(k2, 2, 1))
    return lo | (hi << 2)


@jit
def derive_transpose_index_kernel(
    values_ptr, index_ptr, out_ptr, D_OUT, D_IN, OUT_W, stride_v, stride_i, stride_o,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # columns of W_R = rows of out
    b = tl.program_id(1)  # output byte: row groups 2b (rows 8b..8b+3) and 2b+1 (8b+4..8b+7)
    valid_c = cols < D_IN
    base = 8 * b
    a0 = _magnitude(values_ptr, index_ptr, base + 0, cols, D_OUT, D_IN, stride_v, stride_i)
    a1 = _magnitude(values_ptr, index_ptr, base + 1, cols, D_OUT, D_IN, stride_v, stride_i)
    a2 = _magnitude(values_ptr, index_ptr, base + 2, cols, D_OUT, D_IN, stride_v, stride_i)
    a3 = _magnitude(values_ptr, index_ptr, base + 3, cols, D_OUT, D_IN, stride_v, stride_i)
    a4 = _magnitude(values_ptr, index_ptr, base + 4, cols, D_OUT, D_IN, stride_v, stride_i)
    a5 = _magnitude(values_ptr, index_ptr, base + 5, cols, D_OUT, D_IN, stride_v, stride_i)
    a6 = _magnitude(values_ptr, index_ptr, base + 6, cols, D_OUT, D_IN, stride_v, stride_i)
    a7 = _magnitude(values_ptr, index_ptr, base + 7, cols, D_OUT, D_IN, stride_v, stride_i)
    first = _two_of_four(a0, a1, a2, a3)
    second = _two_of_four(a4, a5, a6, a7)
    second = tl.where(base + 4 < D_OUT, second, 0)  # a padding group packs as zero offsets
    code = first | (second << 4)
    tl.store(out_ptr + cols * stride_o + b, code.to(tl.uint8), mask=valid_c)


def derive_transpose_index(
    values: Tensor, row_index: Tensor, d_out: int, d_in: int, n: int = 2, m: int = 4
) -> Tensor:
    """M_C of a 2:4 SparseLinear as packed offsets (d_in, ceil(d_out/8)) uint8."""
    if (n, m) != (2, 4):
        raise ValueError(f"derive_transpose_index supports 2:4 only, got {n}:{m}")
    if d_out % 4 or d_in % 4:
        raise ValueError(f"d_out={d_out} and d_in={d_in} must be divisible by 4")
    if values.shape != (d_out, d_in // 2):
        raise ValueError(f"values must be ({d_out}, {d_in // 2}), got {tuple(values.shape)}")
    if row_index.dtype != torch.uint8 or row_index.shape != (d_out, -(-d_in // 8)):
        raise ValueError(f"row_index must be uint8 ({d_out}, {-(-d_in // 8)})")
    if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"values must be fp32, fp16 or bf16 (compared in fp32), got {values.dtype}"
        )
    if values.stride(1) != 1 or row_index.stride(1) != 1:
        raise ValueError("values and row_index must be contiguous along their last dimension")
    check_launchable(values, row_index)
    out_width = -(-d_out // 8)
    out = torch.empty(d_in, out_width, dtype=torch.uint8, device=values.device)
    block_c = 32
    grid = (triton_cdiv(d_in, block_c), out_width)
    derive_transpose_index_kernel[grid](
        values, row_index, out, d_out, d_in, out_width,
        values.stride(0), row_index.stride(0), out.stride(0), BLOCK_C=block_c,
    )  # fmt: skip
    return out


def derive_transpose_index_reference(
    values: Tensor, row_index: Tensor, d_out: int, d_in: int, n: int = 2, m: int = 4
) -> Tensor:
    from slope_lightning.sparse.layout import NMLayout

    layout = NMLayout(d_out, d_in, n, m)
    dense_t = layout.to_dense(values, row_index).t()  # (d_in, d_out)
    return layout.transposed().prune(dense_t)[1]
