"""The autograd function of a SparseLinear: Y = X W_Rᵀ + b with SLoPe's backward.

Input gradient dX = dY W_RC, where W_RC = W_R ⊙ M_C and M_C is an N:M mask of W_R along
d_out; values gradient (dYᵀ X) at M_R. After Mozaffari et al., "SLoPe", arXiv 2405.16325.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from slope_lightning.sparse.backends import OperandCache, SparseBackend, SparseWeight
from slope_lightning.sparse.layout import NMLayout


def compute_dtype_of(x: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def linear_input(ctx: Any, x: Tensor, bias: Tensor | None, d_in: int) -> Tensor:
    """x (..., d_in) as (T, d_in) in the compute dtype, noting on ``ctx`` what the backward
    needs to give the input's and the bias's gradients back (shape, dtypes): the prologue
    of every linear autograd Function of the library (SLoPe's and the baselines')."""
    ctx.compute_dtype = compute_dtype_of(x)
    ctx.x_dtype = x.dtype
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    return x.reshape(-1, d_in).to(ctx.compute_dtype)  # (T, d_in)


def linear_output_grads(
    ctx: Any, dy: Tensor, grad_x2d: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """The input gradient in x's shape and dtype (from (T, d_in)) and the bias gradient, as
    :func:`linear_input` noted them (None where not needed). Call it where autocast is off
    (the bias gradient's sum is an op autocast would move to float32)."""
    grad_x = grad_x2d.reshape(ctx.x_shape).to(ctx.x_dtype) if grad_x2d is not None else None
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = dy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_bias


class _SparseLinearFunction(torch.autograd.Function):
    """Saves X and the packed weight, never a dense one.

    No kernel-side operand outlives the call that needs it: the values change at every
    optimizer step, so a compressed W_R or W_RCᵀ kept between steps would cost memory next to
    the values and could only be reused by gradient accumulation, and detecting a change
    through the parameter's version counter fails under fused optimizers, which do not bump
    it. The forward builds its operand, the backward builds its own.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        row_index: Tensor,
        col_index: Tensor,
        layout: NMLayout,
        backend: SparseBackend,
    ) -> Tensor:
        x2d = linear_input(ctx, x, bias, layout.cols)  # (T, d_in)
        compute_dtype = ctx.compute_dtype
        b = bias.to(compute_dtype) if bias is not None else None
        weight = SparseWeight(values, row_index, layout, compute_dtype, col_index)
        with torch.autocast(x.device.type, enabled=False):
            y2d = backend.forward(x2d, weight, b, None)  # (T, d_out)
        ctx.save_for_backward(x2d, values, row_index, col_index)
        ctx.layout = layout
        ctx.backend = backend
        return y2d.reshape(*x.shape[:-1], layout.rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x2d, values, row_index, col_index = ctx.saved_tensors
        layout: NMLayout = ctx.layout
        backend: SparseBackend = ctx.backend
        dy = grad_out.reshape(-1, layout.rows).to(ctx.compute_dtype)  # (T, d_out)
        weight = SparseWeight(values, row_index, layout, ctx.compute_dtype, col_index)
        grad_x2d = grad_values = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x2d = backend.grad_input(dy, weight, None)  # (T, d_in)
            if ctx.needs_input_grad[1]:
                grad_values = backend.grad_values(dy, x2d, weight).to(values.dtype)
            grad_x, grad_bias = linear_output_grads(ctx, dy, grad_x2d)
        return grad_x, grad_values, grad_bias, None, None, None, None


#: Y = X W_Rᵀ + b for x (..., d_in), differentiable with SLoPe's double-pruned backward:
#: ``sparse_linear(x, values, bias, row_index, col_index, layout, backend)``.
sparse_linear: Callable[
    [Tensor, Tensor, Tensor | None, Tensor, Tensor, NMLayout, SparseBackend], Tensor
] = _SparseLinearFunction.apply


def sparse_linear_inference(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    row_index: Tensor,
    layout: NMLayout,
    backend: SparseBackend,
    operands: OperandCache,
    key: Hashable,
) -> Tensor:
    """Y = X W_Rᵀ + b for x (..., d_in) without autograd, reusing the kernel-side operands in
    ``operands`` while ``key`` (the parameters' storage and version, the compute dtype) holds."""
    compute_dtype = compute_dtype_of(x)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, layout.cols).to(compute_dtype)  # (T, d_in)
    b = bias.to(compute_dtype) if bias is not None else None
    weight = SparseWeight(values, row_index, layout, compute_dtype, key=key)
    with torch.autocast(x.device.type, enabled=False):
        y2d = backend.forward(x2d, weight, b, operands)  # (T, d_out)
    return y2d.reshape(*lead, layout.rows)
