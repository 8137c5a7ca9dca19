"""Shared test helpers: an independent masked-dense reference of the SLoPe linear layer."""

from __future__ import annotations

import os

import torch

# Triton kernels run in Triton's CPU interpreter when there is no GPU. The switch is read when
# triton is first imported (Lightning imports it), so it is set here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest


def triton_interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels in this environment (None if it can).

    triton < 3.9's interpreter calls ``int()`` on one-element arrays, which numpy 2.4 refuses
    (seen with triton 3.6 + numpy 2.4.x; numpy 2.3 works, as does triton 3.9 + numpy 2.4).
    CI then skips the interpreted kernel tests with this reason instead of failing by luck.
    """
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(p) for p in np.__version__.split(".")[:2])
    if triton_version < (3, 9) and numpy_version >= (2, 4):
        return (
            f"triton {triton.__version__}'s CPU interpreter fails with numpy {np.__version__} "
            "(int() of a 1-element array); install 'numpy<2.4' or triton>=3.9 to run these"
        )
    return None


#: Marks a test that runs Triton kernels in the CPU interpreter.
needs_triton_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() is False and triton_interpreter_problem() is not None,
    reason=str(triton_interpreter_problem()),
)


def reference_nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask along the last dim, written independently of the library (numpy, by loops
    over groups): keep the N largest |w| per group, ties to the lower offset."""
    w = np.abs(weight.detach().cpu().numpy())
    rows, cols = w.shape
    mask = np.zeros_like(w, dtype=bool)
    for r in range(rows):
        for g in range(0, cols, m):
            group = w[r, g : g + m]
            order = sorted(range(m), key=lambda i: (-group[i], i))
            for i in order[:n]:
                mask[r, g + i] = True
    return torch.from_numpy(mask)


def reference_slope_linear(weight, bias, x, grad_out, n, m):
    """Forward and gradients of SLoPe by masked dense algebra (float64).

    Returns (y, dx, dw, db) with dw a dense (d_out, d_in) gradient at M_R's positions.
    """
    mask_r = reference_nm_mask(weight, n, m)
    w_r = weight * mask_r
    mask_c = reference_nm_mask(w_r.t(), n, m).t()
    w_rc = w_r * mask_c
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    y = x @ w_r.t() + (bias if bias is not None else 0)
    dx = (g2 @ w_rc).reshape(x.shape)
    dw = (g2.t() @ x2) * mask_r
    db = g2.sum(0) if bias is not None else None
    return y, dx, dw, db, mask_r


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)
