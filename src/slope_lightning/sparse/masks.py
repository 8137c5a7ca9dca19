"""N:M structured masks: which N of every M consecutive entries a sparse weight keeps.

A mask here is described by *positions*: for a tensor pruned N:M along one dimension, the
positions are an integer tensor whose last dimension lists, for each group of M entries, the
N kept offsets inside the group (0..M-1) in ascending order. Positions are what packed
storage keeps (see ``packing.py``); a dense boolean mask is only ever built transiently.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
from torch import Tensor

#: How the kept entries of each group are chosen: the one vocabulary of every conversion.
#: ``magnitude``: the largest |w| (the paper); ``random``: uniformly; ``wanda``: the largest
#: |w|·‖X‖ (Sun et al. 2023), which needs calibration batches (``sparse.calibration``).
#: A conversion that takes fewer says so with a check naming the ones it takes.
MaskMethod = Literal["magnitude", "random", "wanda"]
MASK_METHODS: tuple[MaskMethod, ...] = ("magnitude", "random", "wanda")


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
        method: "magnitude" or "random" (uniform choice of N offsets per group); for
            "wanda", give Wanda's scores with "magnitude".
        generator: random source for ``method="random"``.

    Returns:
        (..., K // m, n) int64 tensor of kept offsets within each group, ascending.
    """
    check_nm(n, m)
    k = scores.shape[-1]
    if k % m != 0:
        raise ValueError(f"dimension of size {k} is not divisible by m={m}")
    groups = scores.reshape(*scores.shape[:-1], k // m, m)  # (..., G, m), a view
    if method == "magnitude":
        keys = groups.detach()
    elif method == "random":
        keys = torch.rand(groups.shape, generator=generator, device="cpu").to(groups.device)
    elif method == "wanda":
        raise ValueError(
            "mask method 'wanda' scores weights by calibration inputs: pass the scores "
            "(sparse.calibration.wanda_scores) with method='magnitude'"
        )
    else:
        raise ValueError(f"unknown mask method {method!r}; choose one of {MASK_METHODS}")
    if m <= _PAIRWISE_MAX_M:
        return _select_pairwise(keys, n, m, magnitude=method == "magnitude")
    return _select_sorted(keys, n, magnitude=method == "magnitude")


#: Largest group size selected by pairwise comparisons and a lookup table (2:4, 1:4, 3:4,
#: 1:2, 1:3, 2:5...); larger groups are sorted. The table has 2**(m(m-1)/2) rows: 64 for m=4.
_PAIRWISE_MAX_M = 5


def _select_sorted(groups: Tensor, n: int, magnitude: bool) -> Tensor:
    """Kept offsets (..., G, n) by a stable descending sort of each group (any m)."""
    keys = groups.abs() if magnitude else groups
    if keys.is_floating_point():
        keys = torch.nan_to_num(keys, nan=float("inf"))  # a NaN is never silently dropped
    # Stable descending sort: among equal magnitudes the lower offset wins.
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices  # (..., G, m)
    return torch.sort(order[..., :n], dim=-1).values  # (..., G, n)


def _select_pairwise(groups: Tensor, n: int, m: int, magnitude: bool) -> Tensor:
    """Kept offsets (..., G, n) from the m(m-1)/2 comparisons inside each group.

    The same choice as :func:`_select_sorted` (offset b ranks before offset a < b iff its key
    is strictly larger, so ties go to the lower offset), in eight elementwise ops over
    contiguous rows of G entries for 2:4, whatever the layer size, instead of a sort per
    group of m: a sort costs tens of ns per entry on CPU, and every op is a parallel region,
    which costs a scheduler wait when the cores are shared.
    """
    lead = groups.shape[:-1]
    pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
    # Offset-major keys, (m, P) with P groups: every comparison reads contiguous rows.
    keys = torch.empty((m, *lead), dtype=groups.dtype, device=groups.device)
    if magnitude:
        torch.abs(groups.movedim(-1, 0), out=keys)
        if keys.is_floating_point():
            keys.nan_to_num_(nan=float("inf"))  # a NaN is never silently dropped
    else:
        keys.copy_(groups.movedim(-1, 0))
    keys = keys.view(m, -1)  # (m, P)
    beats = torch.empty(len(pairs), keys.shape[1], dtype=torch.bool, device=keys.device)
    row = 0
    for a in range(m - 1):  # pairs (a, a+1), ..., (a, m-1) in one op
        torch.gt(keys[a + 1 :], keys[a], out=beats[row : row + m - 1 - a])  # b strictly larger
        row += m - 1 - a
    # One code per group: bit p says that pair p's higher offset won (< 2**10 for m <= 5).
    bits = beats.view(torch.uint8) if len(pairs) <= 8 else beats.to(torch.int16)
    shifts = torch.arange(len(pairs), dtype=bits.dtype, device=keys.device)[:, None]
    code = (bits << shifts).sum(0, dtype=torch.int32)  # (P,)
    table = pairwise_table(n, m, keys.device)  # (2**pairs, n)
    return torch.index_select(table, 0, code).view(*lead, n)  # (..., G, n)


@lru_cache(maxsize=64)
def pairwise_table(n: int, m: int, device: torch.device) -> Tensor:
    """Kept offsets (ascending) for every outcome of the pairwise comparisons, (2**P, n).

    Offset a's rank is the number of offsets that beat it; the n of rank < n are kept.
    Outcomes that no keys produce (cycles) get some row; they are never looked up.

    The one cache of the tables, per (n, m, device), for the process (like
    ``layout.byte_tables``): built once in plain Python and copied to a device once, so an
    M_C refresh, which runs in every training step, pays no host-to-device copy (on CUDA a
    copy from pageable host memory synchronises the host with the GPU). Tables are a pure
    function of (n, m); callers must not write to them.
    """
    if device.type != "cpu":
        return pairwise_table(n, m, torch.device("cpu")).to(device)
    pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
    rows = []
    for code in range(1 << len(pairs)):
        beaten = [0] * m
        for p, (a, b) in enumerate(pairs):
            beaten[a if code >> p & 1 else b] += 1  # bit set: the higher offset b won
        kept = [offset for offset in range(m) if beaten[offset] < n]
        rows.append((kept + [0] * n)[:n])
    return torch.tensor(rows, dtype=torch.int64, device="cpu")  # also under a meta default


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
