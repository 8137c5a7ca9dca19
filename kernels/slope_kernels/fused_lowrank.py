"""out = C + (A @ B)·s (+ bias) in one kernel: the (X L)·(s R) step of SLoPe's fused sparse +
low-rank inference path (after Mozaffari et al., arXiv 2405.16325), C being the sparse GEMM's
output. Kernel, host wrapper and plain-torch reference, torchao style."""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import check_launchable, jit, tl


@jit
def fused_lowrank_kernel(
    c_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, T, N, R, scale,
    stride_ct, stride_cn, stride_at, stride_ar, stride_br, stride_bn, stride_ot, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ks = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(
            a_ptr + rows[:, None] * stride_at + ks[None, :] * stride_ar,
            mask=(rows[:, None] < T) & (ks[None, :] < R),
            other=0.0,
        )
        b = tl.load(
            b_ptr + ks[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=(ks[:, None] < R) & (cols[None, :] < N),
            other=0.0,
        )
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    inside = (rows[:, None] < T) & (cols[None, :] < N)
    c = tl.load(c_ptr + rows[:, None] * stride_ct + cols[None, :] * stride_cn, mask=inside)
    out = c.to(tl.float32) + acc * scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        out += bias.to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=inside,
    )


def fused_lowrank_add(
    c: Tensor, a: Tensor, b: Tensor, scale: float = 1.0, bias: Tensor | None = None
) -> Tensor:
    """C (T, N) + (A (T, r) @ B (r, N))·scale (+ bias (N,)), fp32 accumulation, C's dtype."""
    if c.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"2-D operands expected, got C {c.shape}, A {a.shape}, B {b.shape}")
    (t, n), (t_a, r), (r_b, n_b) = c.shape, a.shape, b.shape
    if t_a != t or r_b != r or n_b != n:
        raise ValueError(f"shapes do not chain: C {t}x{n}, A {t_a}x{r}, B {r_b}x{n_b}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    check_launchable(c, a, b)
    out = torch.empty_like(c)
    block_t, block_n, block_r = 16, 32, 16  # tl.dot needs every block dimension >= 16
    grid = (triton_cdiv(t, block_t), triton_cdiv(n, block_n))
    fused_lowrank_kernel[grid](
        c, a, b, bias if bias is not None else c, out, t, n, r, float(scale),
        c.stride(0), c.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def fused_lowrank_add_reference(
    c: Tensor, a: Tensor, b: Tensor, scale: float = 1.0, bias: Tensor | None = None
) -> Tensor:
    """Plain torch: the composition the kernel replaces."""
    out = c.float() + (a.float() @ b.float()) * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(c.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
