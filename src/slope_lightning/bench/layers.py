"""Step time of one linear layer, SLoPe (each backend) vs nn.Linear, in the same run.

On a machine without a GPU this measures the ``reference`` backend (plain torch): it tells
the overhead of the method's bookkeeping, not a sparse speedup (CPUs have no 2:4 kernels).
On a GPU, pass ``--backends reference,cusparselt,cutlass,auto --dtype bfloat16``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slope_lightning.bench.common import median_seconds
from slope_lightning.sparse import SparseLinear

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096),)


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).sum().backward()


def _fwd(layer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        layer(x)


def layer_rows(
    shapes=DEFAULT_SHAPES,
    tokens: int = 2048,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    backends: tuple[str, ...] = ("reference",),
    device: str | None = None,
) -> list[dict[str, Any]]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for d_out, d_in in shapes:
        torch.manual_seed(0)
        dense = nn.Linear(d_in, d_out, bias=False, dtype=dtype, device=device)
        x = torch.randn(tokens, d_in, dtype=dtype, device=device, requires_grad=True)
        for backend in backends:
            sparse = SparseLinear.from_linear(dense, backend=backend)
            label = backend if device != "cpu" else f"{backend} (CPU)"
            for phase, run in (("forward", _fwd), ("fwd+bwd", _fwd_bwd)):
                dense_s = median_seconds(lambda run=run, d=dense, x=x: run(d, x), repeats)
                sparse_s = median_seconds(lambda run=run, s=sparse, x=x: run(s, x), repeats)
                rows.append(
                    {
                        "shape (out x in)": f"{d_out}x{d_in}",
                        "tokens": tokens,
                        "dtype": str(dtype).removeprefix("torch."),
                        "phase": phase,
                        "backend": label,
                        "dense_ms": dense_s * 1e3,
                        "slope_ms": sparse_s * 1e3,
                        "slope/dense": sparse_s / dense_s,
                    }
                )
            choice = getattr(sparse.backend, "choice", None)
            if choice is not None:
                rows[-1]["backend"] += f" -> {choice.name}"
    return rows


COLUMNS = [
    "shape (out x in)",
    "tokens",
    "dtype",
    "phase",
    "backend",
    "dense_ms",
    "slope_ms",
    "slope/dense",
]
