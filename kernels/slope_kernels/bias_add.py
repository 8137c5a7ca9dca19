"""y + bias over rows in one pass: the bias add after a sparse GEMM (the SLoPe paper found
the generic broadcast add slow there). Kernel, host wrapper and plain-torch reference."""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import check_launchable, jit, tl
from slope_kernels.fused_lowrank import triton_cdiv


@jit
def bias_add_kernel(
    y_ptr, bias_ptr, out_ptr, T, N, stride_yt, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < T) & (cols[None, :] < N)
    y = tl.load(y_ptr + rows[:, None] * stride_yt + cols[None, :], mask=inside)
    bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
    out = y.to(tl.float32) + bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_ot + cols[None, :], out.to(y.dtype), mask=inside)


def bias_add(y: Tensor, bias: Tensor, inplace: bool = False) -> Tensor:
    """y (T, N) + bias (N,); rows must be contiguous (stride 1 along N)."""
    if y.dim() != 2 or bias.shape != (y.shape[1],):
        raise ValueError(
            f"need y (T, N) and bias (N,), got {tuple(y.shape)} and {tuple(bias.shape)}"
        )
    if y.stride(1) != 1:
        raise ValueError("y must be contiguous along its last dimension")
    check_launchable(y, bias)
    out = y if inplace else torch.empty_like(y)
    t, n = y.shape
    block_t, block_n = 16, 64
    grid = (triton_cdiv(t, block_t), triton_cdiv(n, block_n))
    bias_add_kernel[grid](
        y, bias, out, t, n, y.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_N=block_n
    )
    return out


def bias_add_reference(y: Tensor, bias: Tensor) -> Tensor:
    return (y.float() + bias.float()).to(y.dtype)
