"""The packed values' gradient in one pass: entries of the dense weight gradient dYᵀX at M_R's
positions, decoding the 2-bit packed offsets in the kernel (SLoPe's 2:4 layout). Kernel, host
wrapper and plain-torch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import check_launchable, jit, tl
from slope_kernels.fused_lowrank import triton_cdiv


@jit
def gather_packed_grad_kernel(
    grad_ptr, index_ptr, out_ptr, ROWS, KEPT, stride_g, stride_i, stride_o,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kept = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < ROWS) & (kept[None, :] < KEPT)
    # 2:4: four 2-bit offsets per byte; kept value j belongs to group j // 2.
    byte = tl.load(
        index_ptr + rows[:, None] * stride_i + (kept[None, :] // 4), mask=inside, other=0
    )
    offset = (byte.to(tl.int32) >> (2 * (kept[None, :] % 4))) & 3
    column = (kept[None, :] // 2) * 4 + offset
    values = tl.load(grad_ptr + rows[:, None] * stride_g + column, mask=inside, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_o + kept[None, :], values, mask=inside)


def gather_packed_grad(grad_dense: Tensor, index: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """grad_dense (rows, cols) at the kept positions packed in index (rows, cols/8) uint8."""
    if (n, m) != (2, 4):
        raise ValueError(f"gather_packed_grad supports 2:4 only, got {n}:{m}; use the reference")
    rows, cols = grad_dense.shape
    if cols % 4:
        raise ValueError(f"cols={cols} is not divisible by m=4")
    kept = cols // 2
    if index.dtype != torch.uint8 or index.shape != (rows, -(-kept // 4)):
        raise ValueError(
            f"index must be uint8 of shape ({rows}, {-(-kept // 4)}), got "
            f"{index.dtype} {tuple(index.shape)}"
        )
    if grad_dense.stride(1) != 1 or index.stride(1) != 1:
        raise ValueError("grad_dense and index must be contiguous along their last dimension")
    check_launchable(grad_dense, index)
    out = grad_dense.new_empty(rows, kept)
    block_r, block_k = 16, 64
    grid = (triton_cdiv(rows, block_r), triton_cdiv(kept, block_k))
    gather_packed_grad_kernel[grid](
        grad_dense, index, out, rows, kept, grad_dense.stride(0), index.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def gather_packed_grad_reference(
    grad_dense: Tensor, index: Tensor, n: int = 2, m: int = 4
) -> Tensor:
    from slope_lightning.sparse.layout import NMLayout

    rows, cols = grad_dense.shape
    return NMLayout(rows, cols, n, m).gather(grad_dense, index)
