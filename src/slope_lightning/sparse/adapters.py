"""Lazy low-rank adapters for SparseLinear: Y = X W_Rᵀ + s·(X L) R + b.

L (d_in × r) is stored as Lᵀ (r, d_in) pruned N:M along d_in, the same layout as the sparse
weight, so that [W_R ; Lᵀ] stacks into one N:M matrix and the merged inference path is exact
(the SLoPe paper prunes L after training instead, which changes the model).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from slope_lightning.sparse.dtensor import gathered_for_compute
from slope_lightning.sparse.layout import NMLayout

AdapterInit = Literal["slope", "peft"]


def resolve_rank(rank: int | float, in_features: int, out_features: int, where: str) -> int:
    """Turn ``rank`` (an int, or a float fraction of d_in) into an int and validate it."""
    if isinstance(rank, bool) or not isinstance(rank, int | float):
        raise ValueError(f"{where}: rank must be an int or a float fraction, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise ValueError(
                f"{where}: a fractional rank must lie in (0, 1) (e.g. 0.0156 for 1.56% of "
                f"d_in), got {rank}"
            )
        resolved = max(1, round(rank * in_features))
    else:
        resolved = rank
    limit = min(in_features, out_features)
    if resolved <= 0 or resolved >= limit:
        raise ValueError(
            f"{where}: adapter rank {resolved} must satisfy 0 < rank < min(d_in, d_out) = {limit}"
        )
    return resolved


class LowRankAdapter(nn.Module):
    """The pair (L, R) and the scale s of one SparseLinear's adapter.

    Args:
        in_features, out_features: the base layer's d_in and d_out.
        rank: r.
        n, m: the N:M pattern kept on Lᵀ along d_in.
        init: "slope" (the paper: L ~ N(0, 1), R = 0, s = 1/r) or "peft" (PEFT's LoRA:
            L Kaiming-uniform, R = 0, s = alpha/r).
        alpha: numerator of the scale for ``init="peft"``.
        generator: random source for L.
    """

    down_index: Tensor  # packed offsets of Lᵀ (buffer)
    scale: Tensor  # s, a 0-d float32 buffer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        n: int,
        m: int,
        init: AdapterInit = "slope",
        alpha: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.layout = NMLayout(rank, in_features, n, m)
        dense_down = torch.empty(rank, in_features, dtype=torch.float32)  # Lᵀ, (r, d_in)
        if init == "slope":
            dense_down.normal_(0.0, 1.0, generator=generator)
            scale = 1.0 / rank
        elif init == "peft":
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear
            dense_down.uniform_(-bound, bound, generator=generator)
            scale = (alpha if alpha is not None else float(rank)) / rank
        else:
            raise ValueError(f"unknown adapter init {init!r}; choose 'slope' or 'peft'")
        down_values, down_index = self.layout.prune(dense_down)
        self.down_values = nn.Parameter(down_values.to(device=device, dtype=dtype))  # (r, d_in·N/M)
        self.register_buffer("down_index", down_index.to(device))  # packed offsets
        self.up = nn.Parameter(torch.zeros(rank, out_features, device=device, dtype=dtype))  # R
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32, device=device))

    def down_dense(self) -> Tensor:
        """Lᵀ as a dense (r, d_in) tensor; differentiable w.r.t. ``down_values``.

        Under FSDP2 (parameters sharded by :func:`~slope_lightning.sparse.dtensor.shard_like`)
        this and every method below gather them: a collective."""
        return self.layout.to_dense(gathered_for_compute(self.down_values), self.down_index)

    def forward(self, x: Tensor) -> Tensor:
        """s·(X L) R for X of shape (..., d_in); returns (..., d_out)."""
        down = self.down_dense().to(x.dtype)  # (r, d_in)
        hidden = x @ down.t()  # (..., r)
        return (hidden @ gathered_for_compute(self.up).to(x.dtype)) * self.scale.to(x.dtype)

    def delta_weight(self) -> Tensor:
        """s·(L R)ᵀ as a dense (d_out, d_in) tensor (for export to a dense layer)."""
        return (gathered_for_compute(self.up).t() @ self.down_dense()) * self.scale

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scale={float(self.scale):.4g}, n={self.layout.n}, m={self.layout.m}"
        )
