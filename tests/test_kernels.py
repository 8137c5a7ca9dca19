"""Every Triton kernel against its plain-torch reference (and the library), on small odd shapes.

Without a GPU the kernels run in Triton's CPU interpreter (set before slope_kernels is
imported); with one they run compiled on CUDA, as the `gpu` group.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # also set by conftest.py, before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from slope_kernels import (
    bias_add,
    bias_add_reference,
    derive_transpose_index,
    derive_transpose_index_reference,
    fused_lowrank_add,
    fused_lowrank_add_reference,
    gather_packed_grad,
    gather_packed_grad_reference,
)
from slope_kernels._triton import interpreting
from slope_lightning.sparse import SparseLinear

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [] if DEVICE == "cpu" else [pytest.mark.gpu]


def tensor(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(("tokens", "rank", "width"), [(2, 4, 8), (13, 5, 40), (67, 17, 36)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_lowrank_add_matches_reference(tokens, rank, width, with_bias):
    c, a, b = tensor(tokens, width), tensor(tokens, rank, seed=1), tensor(rank, width, seed=2)
    bias = tensor(width, seed=3) if with_bias else None
    out = fused_lowrank_add(c, a, b, 0.25, bias)
    torch.testing.assert_close(out, fused_lowrank_add_reference(c, a, b, 0.25, bias))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_lowrank_add_keeps_half_precision_outputs(dtype):
    c, a, b = tensor(13, 40, dtype=dtype), tensor(13, 4, dtype=dtype), tensor(4, 40, dtype=dtype)
    out = fused_lowrank_add(c, a, b, 0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, fused_lowrank_add_reference(c, a, b, 0.5), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("rows", "cols"), [(2, 8), (13, 36), (67, 132)])
def test_bias_add_matches_reference(rows, cols):
    y, bias = tensor(rows, cols), tensor(cols, seed=1)
    torch.testing.assert_close(bias_add(y, bias), bias_add_reference(y, bias), atol=0, rtol=0)
    inplace = y.clone()
    assert bias_add(inplace, bias, inplace=True).data_ptr() == inplace.data_ptr()


@pytest.mark.parametrize(("rows", "cols"), [(2, 8), (13, 36), (67, 132)])
def test_gather_packed_grad_is_the_library_gather_exactly(rows, cols):
    layer = SparseLinear(cols, (rows + 3) // 4 * 4)
    index = layer.row_index[:rows].to(DEVICE)
    grad = tensor(rows, cols)
    out = gather_packed_grad(grad, index)
    assert torch.equal(out, gather_packed_grad_reference(grad, index))


@pytest.mark.parametrize(("d_out", "d_in"), [(4, 8), (12, 36), (20, 132), (68, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_derive_transpose_index_equals_the_layer_mask_bit_for_bit(d_out, d_in, dtype, ties):
    weight = torch.randint(-2, 3, (d_out, d_in)).float() if ties else torch.randn(d_out, d_in)
    layer = SparseLinear(d_in, d_out, weight=weight.to(dtype))
    values, index = layer.values.detach().to(DEVICE), layer.row_index.to(DEVICE)
    out = derive_transpose_index(values, index, d_out, d_in)
    assert out.dtype == torch.uint8
    assert torch.equal(out.cpu(), layer.col_index)
    assert torch.equal(out, derive_transpose_index_reference(values, index, d_out, d_in))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fused_lowrank_add(tensor(4, 8), tensor(4, 2), tensor(3, 8)), "do not chain"),
        (lambda: bias_add(tensor(4, 8), tensor(7)), "bias"),
        (
            lambda: gather_packed_grad(tensor(4, 8), torch.zeros(4, 1, dtype=torch.uint8), 2, 8),
            "2:4 only",
        ),
        (lambda: gather_packed_grad(tensor(4, 8), torch.zeros(4, 3, dtype=torch.uint8)), "shape"),
        (
            lambda: derive_transpose_index(
                tensor(4, 4, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.uint8), 4, 8
            ),
            "fp32",
        ),
    ],
)
def test_bad_inputs_are_refused_with_the_sizes(call, match):
    with pytest.raises(ValueError, match=match):
        call()
