"""Optional Triton import and the launch checks every wrapper shares.

A CPU install without triton still imports ``slope_kernels``; calling a kernel then raises and
points to its ``*_reference``. Whether the kernels run in Triton's CPU interpreter is fixed
when this package is imported (``triton.jit`` decides at decoration time), so ``INTERPRET``
records it then rather than re-reading the environment at every call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # a CPU install without triton still imports slope_kernels
    triton = None
    tl = None
    TRITON_AVAILABLE = False

# Kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1 before this import).
INTERPRET: bool = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in (
    "1",
    "true",
    "on",
    "yes",
)

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` when Triton is installed; the plain function otherwise (never launched)."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn


def cdiv(a: int, b: int) -> int:
    """Ceiling division (how many blocks of ``b`` cover ``a``)."""
    return -(-a // b)


def block_size(size: int, low: int, high: int) -> int:
    """A power-of-two block for a dimension of ``size``: at least ``low``, at most ``high``."""
    return max(low, min(high, 1 << max(0, size - 1).bit_length()))


def check_launchable(name: str, *tensors: Tensor) -> None:
    """Raise unless Triton can run ``name`` on these tensors.

    Compiled kernels need CUDA tensors; under the interpreter the tensors may be on the CPU.
    All tensors must share one device.

    Raises:
        RuntimeError: triton is missing, or the device does not fit how the kernels were built.
        ValueError: the tensors are on different devices.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            f"{name} needs triton (pip install triton); {name}_reference computes the same "
            "in plain torch on any device"
        )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}"
        )
    device = next(iter(devices))
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{name}: got {device} tensors, but slope_kernels was imported without "
            "TRITON_INTERPRET=1, so its kernels are compiled for CUDA; set TRITON_INTERPRET=1 "
            f"before the first import to run on the CPU, or use {name}_reference"
        )


def check_dtype(name: str, label: str, tensor: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise a ValueError naming the argument unless ``tensor.dtype`` is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name}: {label} must be {names}; got {tensor.dtype}")


def check_rows_contiguous(name: str, **tensors: Tensor) -> None:
    """Raise unless each 2-D tensor is contiguous along its last dimension (stride 1)."""
    for label, tensor in tensors.items():
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{name}: {label} {tuple(tensor.shape)} must be contiguous along its last "
                f"dimension (stride 1), got strides {tensor.stride()}; call .contiguous()"
            )


def check_operands(name: str, floats: tuple[str, ...] = (), **tensors: Tensor) -> None:
    """The checks a wrapper runs before its launch, once shapes are known to be right: the
    tensors named in ``floats`` are fp32/fp16/bf16, every tensor is contiguous along its last
    dimension, and all are on one device the kernels can run on.

    Raises:
        ValueError: a dtype, a strided last dimension, or mixed devices.
        RuntimeError: triton is missing or the device does not fit.
    """
    for label in floats:
        check_dtype(name, label, tensors[label], FLOAT_DTYPES)
    check_rows_contiguous(name, **tensors)
    check_launchable(name, *tensors.values())
