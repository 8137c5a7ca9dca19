"""N:M structured masks: which N of every M consecutive entries a sparse weight keeps.

A mask here is described by *positions*: for a tensor pruned N:M along one dimension, the
positions are an integer tensor whose last dimension lists, for each group of M entries, the
N kept offsets inside the group (0..M-1) in ascending order. Positions are what packed
storage keeps (see ``packing.py``); a dense boolean mask is only ever built transiently.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

MaskMethod = Literal["magnitude", "random"]


def check_nm(n: int, m: int) -> None:
    """Raise a ValueError unless ``0 < n < m`` (an N:M pattern that actually prunes)."""
    if not (isinstance(n, int) and isinstance(m, int)):
        raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
    if m < 2 or n < 1 or n >= m:
        raise ValueError(
            f"invalid N:M pattern {n}:{m}: need 1 <= n < m (e.g. n=2, m=4 for 2:4 sparsity)"
        )
    if m > 256:
        raise ValueError(f"m={m} is too large: group positions must fit in one byte (m <= 256)")


def nm_positions(
    scores: Tensor,
    n: int,
    m: int,
    method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose N of every M consecutive entries along the last dimension of ``scores``.

    Args:
        scores: (..., K) tensor, K divisible by m. With ``method="magnitude"`` the entries of
            largest absolute value are kept; ties go to the lower offset, so the choice is
            deterministic.
        n, m: the N:M pattern.
        method: "magnitude" or "random" (uniform choice of N offsets per group).
        generator: random source for ``method="random"``.

    Returns:
        (..., K // m, n) int64 tensor of kept offsets within each group, ascending.
    """
    check_nm(n, m)
    k = scores.shape[-1]
    if k % m != 0:
        raise ValueError(f"dimension of size {k} is not divisible by m={m}")
    groups = scores.reshape(*scores.shape[:-1], k // m, m)  # (..., G, m)
    if method == "magnitude":
        keys = groups.detach().abs()
        if keys.is_floating_point():
            keys = torch.nan_to_num(keys, nan=float("inf"))  # a NaN is never silently dropped
    elif method == "random":
        keys = torch.rand(groups.shape, generator=generator, device="cpu").to(groups.device)
    else:
        raise ValueError(f"unknown mask method {method!r}; choose 'magnitude' or 'random'")
    # Stable descending sort: among equal magnitudes the lower offset wins.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # (..., G, m)
    kept = order[..., :n]
    return torch.sort(kept, dim=-1).values  # (..., G, n)


def positions_to_mask(positions: Tensor, m: int) -> Tensor:
    """Dense boolean mask (..., G*m) from kept offsets (..., G, n). Transient use only."""
    *lead, g, _ = positions.shape
    mask = torch.zeros(*lead, g, m, dtype=torch.bool, device=positions.device)
    mask.scatter_(-1, positions, True)
    return mask.reshape(*lead, g * m)


def positions_to_columns(positions: Tensor, m: int) -> Tensor:
    """Absolute indices along the pruned dimension, (..., G*n), from offsets (..., G, n)."""
    g = positions.shape[-2]
    base = torch.arange(g, device=positions.device).unsqueeze(-1) * m  # (G, 1)
    return (positions + base).flatten(-2)


def nm_mask(
    weight: Tensor,
    n: int = 2,
    m: int = 4,
    dim: int = -1,
    method: MaskMethod = "magnitude",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boolean N:M mask of ``weight`` along ``dim`` (a convenience for inspection and tests).

    ``dim=-1`` prunes along d_in (the row mask M_R of a linear weight); ``dim=0`` prunes along
    d_out (the column mask M_C used for the double-pruned backward).
    """
    moved = weight.movedim(dim, -1)
    mask = positions_to_mask(nm_positions(moved, n, m, method, generator), m)
    return mask.movedim(-1, dim)
