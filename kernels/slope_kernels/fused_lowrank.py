"""out = C + (A @ B)·s (+ bias) in one kernel: the (X L)·(s R) step of SLoPe's fused sparse +
low-rank inference path, C being the sparse GEMM's output (Mozaffari et al., arXiv 2405.16325;
file layout after torchao's kernels: kernel, host wrapper, plain-torch reference).

Fusing saves a round trip of the (T, N) output through memory: a separate matmul, scale,
add and bias add each read and write it once more.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slope_kernels._triton import (
    FLOAT_DTYPES,
    INTERPRET,
    block_size,
    cdiv,
    check_dtype,
    check_launchable,
    jit,
    tl,
)


@jit
def fused_lowrank_kernel(
    c_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, T, N, R, scale,
    stride_ct, stride_cn, stride_at, stride_ar, stride_br, stride_bn, stride_ot, stride_on,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_T, BLOCK_N) tile of the output; the rank is reduced in BLOCK_R steps."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ks = r0 + tl.arange(0, BLOCK_R)
        # Out-of-range ranks load as zeros, so a rank below tl.dot's minimum block of 16 works.
        a = tl.load(
            a_ptr + rows[:, None] * stride_at + ks[None, :] * stride_ar,
            mask=(rows[:, None] < T) & (ks[None, :] < R),
            other=0.0,
        )  # (BLOCK_T, BLOCK_R)
        b = tl.load(
            b_ptr + ks[:, None] * stride_br + cols[None, :] * stride_bn,
            mask=(ks[:, None] < R) & (cols[None, :] < N),
            other=0.0,
        )  # (BLOCK_R, BLOCK_N)
        if DOT_FP32:
            # fp32 like torch's default (no TF32); also bf16 under the interpreter, whose
            # numpy dot has no bf16 type.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)  # fp16/bf16 tensor cores, fp32 accumulation
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
    """C + (A @ B)·scale (+ bias), accumulated in fp32, returned in C's dtype.

    Any strides are accepted, so C and A may be column slices of one fused GEMM output
    ([X W_Rᵀ | X L]) without a copy.

    Args:
        c: (T, N) the sparse GEMM's output.
        a: (T, r) the low-rank activations X L; r may be 0 or below 16.
        b: (r, N) the up-projection (with the adapter scale folded in, or pass ``scale``).
        scale: a Python number multiplying A @ B.
        bias: optional (N,) added to every row.

    Raises:
        ValueError: operands not 2-D, shapes that do not chain, a dtype other than
            fp32/fp16/bf16, A or B of another dtype than C, or tensors on different devices.
        RuntimeError: triton is missing or the device does not fit (see ``check_launchable``).
    """
    name = "fused_lowrank_add"
    if c.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name}: needs 2-D C (T, N), A (T, r), B (r, N); got C {tuple(c.shape)}, "
            f"A {tuple(a.shape)}, B {tuple(b.shape)}"
        )
    (t, n), (t_a, r), (r_b, n_b) = c.shape, a.shape, b.shape
    if t_a != t or r_b != r or n_b != n:
        raise ValueError(
            f"{name}: shapes do not chain: C {t}x{n} + A {t_a}x{r} @ B {r_b}x{n_b} "
            "(need A rows = C rows, A cols = B rows, B cols = C cols)"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    check_dtype(name, "C", c, FLOAT_DTYPES)
    for label, operand in (("A", a), ("B", b)):
        if operand.dtype != c.dtype:
            raise ValueError(f"{name}: {label} is {operand.dtype} but C is {c.dtype}; cast first")
    if bias is not None:
        check_dtype(name, "bias", bias, FLOAT_DTYPES)
    check_launchable(name, c, a, b, *([] if bias is None else [bias]))
    out = torch.empty_like(c, memory_format=torch.contiguous_format)  # (T, N)
    if out.numel() == 0:
        return out
    # tl.dot needs every block dimension >= 16.
    block_t, block_n, block_r = block_size(t, 16, 64), block_size(n, 16, 64), block_size(r, 16, 32)
    dot_fp32 = c.dtype == torch.float32 or (INTERPRET and c.dtype == torch.bfloat16)
    grid = (cdiv(t, block_t), cdiv(n, block_n))
    fused_lowrank_kernel[grid](
        c, a, b, bias if bias is not None else c, out, t, n, r, float(scale),
        c.stride(0), c.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def fused_lowrank_add_reference(
    c: Tensor, a: Tensor, b: Tensor, scale: float = 1.0, bias: Tensor | None = None
) -> Tensor:
    """Plain torch, same arithmetic: fp32 C + (A @ B)·scale (+ bias), cast to C's dtype."""
    out = c.float() + (a.float() @ b.float()) * scale  # (T, N)
    if bias is not None:
        out = out + bias.float()
    return out.to(c.dtype)
