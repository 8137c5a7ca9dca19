"""The packed values' gradient in one pass: the dense weight gradient dYᵀX read at M_R's kept
positions, decoding the packed offsets in the kernel (SLoPe's sparse weight gradient, arXiv
2405.16325; kernel, host wrapper and plain-torch reference after torchao's layout).

The packed format is :mod:`slope_kernels.packed_format` (the library's too): kept value j of
a row lies in group j // n at offset ``(index[row, j // P] >> (j % P)·bits) & (2**bits - 1)``,
with ``bits = bits_per_offset(m)`` and P = 8 // bits offsets per byte. The kernel spells that
formula in Triton; the reference calls the format's own :func:`unpack_columns`. Any N:M
pattern works; 2:4 compiles to shifts and masks (2 bits, 4 offsets per byte).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import block_size, cdiv, check_operands, jit, tl
from slope_kernels.packed_format import (
    bits_per_offset,
    check_pattern,
    packed_width,
    unpack_columns,
)


@jit
def gather_packed_grad_kernel(
    grad_ptr, index_ptr, out_ptr, ROWS, KEPT, stride_g, stride_i, stride_o,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_R, BLOCK_K) tile of kept values: decode each offset, load that gradient."""
    PER_BYTE: tl.constexpr = 8 // BITS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kept = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < ROWS) & (kept[None, :] < KEPT)
    byte = tl.load(
        index_ptr + rows[:, None] * stride_i + kept[None, :] // PER_BYTE, mask=inside, other=0
    )  # (BLOCK_R, BLOCK_K) uint8
    offset = (byte.to(tl.int32) >> ((kept[None, :] % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    column = (kept[None, :] // N) * M + offset
    # offset < M always holds for a valid index; checking it keeps a corrupt one in bounds.
    values = tl.load(grad_ptr + rows[:, None] * stride_g + column, mask=inside & (offset < M))
    tl.store(out_ptr + rows[:, None] * stride_o + kept[None, :], values, mask=inside)


def gather_packed_grad(grad_dense: Tensor, index: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Entries of ``grad_dense`` at the kept positions of a packed N:M index.

    Equals ``NMLayout(rows, cols, n, m).gather(grad_dense, index)`` exactly (a pure gather).

    Args:
        grad_dense: (rows, cols) dense gradient, cols divisible by m, contiguous along cols;
            any dtype Triton loads (the values are copied, never converted).
        index: uint8 (rows, ceil(cols·n/m / (8 // bits))) packed offsets, contiguous along
            its last dimension.
        n, m: the N:M pattern (any 1 <= n < m <= 256).

    Returns:
        (rows, cols·n/m) in grad_dense's dtype, ordered like the packed values.

    Raises:
        ValueError: an invalid pattern, cols not divisible by m, an index of the wrong
            dtype or shape, a strided last dimension, or tensors on different devices.
        RuntimeError: triton is missing or the device does not fit.
    """
    name = "gather_packed_grad"
    check_pattern(name, n, m)
    if grad_dense.dim() != 2:
        raise ValueError(
            f"{name}: grad_dense must be 2-D (rows, cols), got {tuple(grad_dense.shape)}"
        )
    rows, cols = grad_dense.shape
    if cols % m:
        raise ValueError(f"{name}: cols={cols} is not divisible by m={m}")
    kept = cols // m * n
    width = packed_width(kept, m)
    if index.dtype != torch.uint8 or tuple(index.shape) != (rows, width):
        raise ValueError(
            f"{name}: index must be uint8 of shape ({rows}, {width}) for a ({rows}, {cols}) "
            f"gradient pruned {n}:{m}, got {index.dtype} {tuple(index.shape)}"
        )
    check_operands(name, grad_dense=grad_dense, index=index)
    out = grad_dense.new_empty(rows, kept)  # (rows, cols·n/m)
    if out.numel() == 0:
        return out
    block_r, block_k = block_size(rows, 1, 16), block_size(kept, 16, 128)
    grid = (cdiv(rows, block_r), cdiv(kept, block_k))
    gather_packed_grad_kernel[grid](
        grad_dense, index, out, rows, kept, grad_dense.stride(0), index.stride(0), out.stride(0),
        N=n, M=m, BITS=bits_per_offset(m), BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def gather_packed_grad_reference(
    grad_dense: Tensor, index: Tensor, n: int = 2, m: int = 4
) -> Tensor:
    """Plain torch: unpack every offset, then one gather along cols."""
    cols = grad_dense.shape[1]
    return grad_dense.gather(1, unpack_columns(index, n, m, cols // m * n))
