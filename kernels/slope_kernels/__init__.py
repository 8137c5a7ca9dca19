"""Triton kernels for SLoPe (arXiv 2405.16325), each beside a plain-torch reference of itself
(torchao's kernel layout), and the packed N:M index format they share with the library.

Layers, lowest first: :mod:`slope_kernels.packed_format` (torch-only: the bit format of a
packed index), :mod:`slope_kernels._triton` (the optional triton import and launch checks),
then one module per kernel (``bias``, ``fused_lowrank``, ``gather_grad``,
``transpose_mask``).

The names below are imported lazily (PEP 562): ``import slope_kernels.packed_format``, which
``slope_lightning.sparse`` does at import time, loads neither triton nor a kernel. Triton is
imported when a kernel, a reference or ``TRITON_AVAILABLE`` is first used, and
``triton.jit`` decides then whether the kernels run compiled (CUDA tensors) or in Triton's
CPU interpreter: set ``TRITON_INTERPRET=1`` before that first use (how CI tests them).
Importing works without triton installed (``TRITON_AVAILABLE`` is then False); calling a
kernel raises and names its reference.

No kernel module is named like a function it exports (``bias.py`` holds ``bias_add``): Python
sets a package attribute to a submodule when it first imports it, which would shadow a
lazily exported function of the same name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from slope_kernels._triton import TRITON_AVAILABLE
    from slope_kernels.bias import bias_add, bias_add_reference
    from slope_kernels.fused_lowrank import fused_lowrank_add, fused_lowrank_add_reference
    from slope_kernels.gather_grad import gather_packed_grad, gather_packed_grad_reference
    from slope_kernels.transpose_mask import (
        derive_transpose_index,
        derive_transpose_index_reference,
    )

#: Public name -> the submodule that defines it (loaded on first access).
_LAZY: dict[str, str] = {
    "TRITON_AVAILABLE": "_triton",
    "bias_add": "bias",
    "bias_add_reference": "bias",
    "derive_transpose_index": "transpose_mask",
    "derive_transpose_index_reference": "transpose_mask",
    "fused_lowrank_add": "fused_lowrank",
    "fused_lowrank_add_reference": "fused_lowrank",
    "gather_packed_grad": "gather_grad",
    "gather_packed_grad_reference": "gather_grad",
}

__all__ = [
    "TRITON_AVAILABLE",
    "bias_add",
    "bias_add_reference",
    "derive_transpose_index",
    "derive_transpose_index_reference",
    "fused_lowrank_add",
    "fused_lowrank_add_reference",
    "gather_packed_grad",
    "gather_packed_grad_reference",
]  # exactly the keys of _LAZY (tests/test_kernels.py checks)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access, and cache the value."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
