"""y + bias over rows in one pass: the bias add after a sparse GEMM, whose kernels (cuSPARSELt
with ``transpose_result``, CUTLASS) return Y without it; the SLoPe paper found the generic
broadcast add slow there (arXiv 2405.16325). Kernel, host wrapper and plain-torch reference,
after torchao's kernel layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import block_size, cdiv, check_operands, jit, tl


@jit
def bias_add_kernel(
    y_ptr, bias_ptr, out_ptr, T, N, stride_yt, stride_ot,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_T, BLOCK_N) tile: add the bias in fp32, store in y's dtype."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < T) & (cols[None, :] < N)
    y = tl.load(y_ptr + rows[:, None] * stride_yt + cols[None, :], mask=inside)
    bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
    out = y.to(tl.float32) + bias.to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=inside,
    )


def bias_add(y: Tensor, bias: Tensor, inplace: bool = False) -> Tensor:
    """y (T, N) + bias (N,) for every row, computed in fp32 and returned in y's dtype.

    Args:
        y: (T, N), contiguous along N (any row stride, e.g. a column slice of a wider output).
        bias: (N,) contiguous; may have another float dtype than y.
        inplace: write into ``y`` and return it (no new allocation).

    Raises:
        ValueError: wrong shapes, a dtype other than fp32/fp16/bf16, a strided last
            dimension, or tensors on different devices.
        RuntimeError: triton is missing or the device does not fit.
    """
    name = "bias_add"
    if y.dim() != 2 or bias.dim() != 1 or bias.shape[0] != y.shape[1]:
        raise ValueError(
            f"{name}: needs y (T, N) and bias (N,), got y {tuple(y.shape)} and bias "
            f"{tuple(bias.shape)}"
        )
    check_operands(name, floats=("y", "bias"), y=y, bias=bias)
    out = y if inplace else torch.empty_like(y, memory_format=torch.contiguous_format)
    t, n = y.shape
    if y.numel() == 0:
        return out
    block_t, block_n = block_size(t, 1, 16), block_size(n, 16, 128)
    grid = (cdiv(t, block_t), cdiv(n, block_n))
    bias_add_kernel[grid](
        y, bias, out, t, n, y.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_N=block_n
    )
    return out


def bias_add_reference(y: Tensor, bias: Tensor) -> Tensor:
    """Plain torch, same arithmetic: fp32 y + bias, cast to y's dtype."""
    return (y.float() + bias.float()).to(y.dtype)
