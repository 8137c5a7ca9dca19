"""Import Triton if it is there; say clearly what is missing when a kernel is called without it."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # a CPU install without triton still imports slope_kernels
    triton = None
    tl = None
    TRITON_AVAILABLE = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise unless Triton can run on these tensors: CUDA, or CPU under the interpreter."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("slope_kernels needs triton (pip install triton); use the *_reference")
    for tensor in tensors:
        if tensor.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"a {tensor.device} tensor needs TRITON_INTERPRET=1 (CPU interpreter) "
                "or a CUDA device; the torch *_reference runs anywhere"
            )


def jit(fn):  # type: ignore[no-untyped-def]
    """``triton.jit`` when Triton is installed; the plain function otherwise (never launched)."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn
