"""Re-deriving M_C of a SparseLinear: what a refresh changed, for plain values and for values
that FSDP2 shards by rows (the one place the shards meet between steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from slope_lightning.sparse.dtensor import (
    all_gather_columns,
    chunk_size,
    full_tensor,
    is_dtensor,
    local_part,
    row_shard,
)
from slope_lightning.sparse.kernel_ops import derive_col_index
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.sparse.packing import bits_per_offset, packed_width

if TYPE_CHECKING:
    from slope_lightning.sparse.linear import SparseLinear


@dataclass(frozen=True)
class TransposeMaskRefresh:
    """What one re-derivation of M_C changed.

    Attributes:
        flipped: entries of M_C that were not kept before and are now (= those dropped).
        kept: nonzeros of W_RC, the double-pruned weight.
        total: kept entries of W_R (its number of values).
    """

    flipped: int
    kept: int
    total: int


def refresh_col_index(layer: SparseLinear, with_stats: bool) -> TransposeMaskRefresh | None:
    """Re-derive ``layer``'s M_C from its current W_R, in place (see
    :meth:`SparseLinear.refresh_transpose_mask`); what changed if ``with_stats``."""
    if is_dtensor(layer.values):
        return refresh_sharded(layer, with_stats)
    new, old = rederive_col_index(layer, keep_old=with_stats)
    if not with_stats:
        return None
    t_layout = layer.layout.transposed()
    with torch.no_grad():
        new_mask = t_layout.mask(new)  # (d_in, d_out), transient
        flipped = int((new_mask & ~t_layout.mask(old)).sum())
        w_r_mask = layer.layout.mask(layer.row_index).t()  # (d_in, d_out)
        kept = int((new_mask & w_r_mask).sum())
    return TransposeMaskRefresh(flipped=flipped, kept=kept, total=layer.values.numel())


def rederive_col_index(layer: SparseLinear, keep_old: bool = False) -> tuple[Tensor, Tensor]:
    """Re-derive an unsharded layer's M_C from its current W_R and make it the layer's (a new
    mask generation); returns (new, previous), the previous intact if ``keep_old``."""
    new = layer._derive_col_index()
    old = store_col_index(layer, new, keep_old=keep_old)
    layer._after_refresh()
    return new, old


def store_col_index(layer: SparseLinear, new: Tensor, keep_old: bool = False) -> Tensor:
    """Make ``new`` the layer's M_C; returns the previous one (intact if ``keep_old``).

    A buffer is replaced; a parameter (see :meth:`SparseLinear.hold_masks_as_parameters`)
    is written in place, so the parameter object an optimizer or FSDP2 holds stays.
    """
    old = layer.col_index
    if "col_index" in layer._parameters:
        old = old.clone() if keep_old else old
        with torch.no_grad():
            layer.col_index.copy_(new)
    else:
        layer.col_index = new
    return old


def refresh_sharded(layer: SparseLinear, with_stats: bool) -> TransposeMaskRefresh | None:
    """:meth:`SparseLinear.refresh_transpose_mask` for values that FSDP2 shards by rows (d_out).

    M_C's groups run along d_out, so each rank derives the columns of M_C that its own
    rows cover, from its own shard of the values and of M_R, and the ranks all-gather
    those packed bytes (2 bits per kept value for 2:4; the whole M_C, transiently): no
    value is gathered. Each rank then keeps its shard of M_C (by rows, d_in) if M_C is
    sharded (see :meth:`SparseLinear.hold_masks_as_parameters`), or all of it if it is a replicated
    buffer.

    Every rank takes the same branch, which depends only on global sizes: where a rank's
    rows do not fill whole bytes of M_C (2:4: a multiple of 8 rows per rank), the
    values are gathered instead (N/M of a dense weight, what a forward gathers anyway).
    """
    values = layer.values
    assert is_dtensor(values)
    shard = row_shard(values)
    if shard is None:
        raise RuntimeError(
            f"layer {layer.name!r}: its values are a DTensor placed {values.placements}; "
            "SparseLinear supports FSDP2/HSDP sharding by rows (Shard(0) on one mesh "
            "dimension, Replicate on the others)"
        )
    group, chunk, index = shard
    layout, t_layout = layer.layout, layer.layout.transposed()
    per_byte = 8 // bits_per_offset(layout.m)
    aligned = chunk % layout.m == 0 and (chunk // layout.m * layout.n) % per_byte == 0
    if aligned:
        local = local_part(values)  # (rows here, d_in·N/M)
        rows = local.shape[0]
        if is_dtensor(layer.row_index):
            my_row_index = local_part(layer.row_index)  # sharded like the values
        else:
            my_row_index = layer.row_index[index * chunk : index * chunk + rows]
        assert my_row_index.shape[0] == rows, "M_R must be sharded like the values"
        if rows:
            local_layout = NMLayout(rows, layout.cols, layout.n, layout.m)
            impl = layer.backend.kernels.transpose_index
            part = derive_col_index(local, my_row_index, local_layout, impl)
        else:  # torch.chunk leaves trailing ranks empty when the rows run out
            part = my_row_index.new_zeros(layout.cols, 0)
        width = packed_width(t_layout.kept_per_row, layout.m)
        new = all_gather_columns(part, group, width)  # (d_in, packed d_out): a collective
    else:
        full_values = values.full_tensor()  # a collective
        full_rows = full_tensor(layer.row_index)
        impl = layer.backend.kernels.transpose_index
        new = derive_col_index(full_values, full_rows, layout, impl)
    # This rank's rows (d_in) of M_C: all of them if M_C is a replicated buffer.
    if is_dtensor(layer.col_index):
        target = local_part(layer.col_index)
        start = index * chunk_size(layout.cols, group.size())  # as FSDP2 shards
        mine = new[start : start + target.shape[0]]
        old = target.clone() if with_stats else target
        with torch.no_grad():
            target.copy_(mine)
        reduce = True
    else:
        start, mine, old = 0, new, layer.col_index
        layer.col_index = new
        reduce = False
    layer._after_refresh()
    if not with_stats:
        return None
    rows_here = mine.shape[0]
    mine_layout = NMLayout(rows_here, t_layout.cols, layout.n, layout.m)
    with torch.no_grad():
        new_mask = mine_layout.mask(mine)  # (d_in here, d_out), transient
        flipped = (new_mask & ~mine_layout.mask(old)).sum()
        w_r_mask = layout.mask(full_tensor(layer.row_index))[:, start : start + rows_here].t()
        counts = torch.stack([flipped, (new_mask & w_r_mask).sum()])
        if reduce:  # each rank counted its own rows of M_C
            torch.distributed.all_reduce(counts, group=group)  # a collective
    flipped_total, kept = (int(c) for c in counts.tolist())
    return TransposeMaskRefresh(flipped=flipped_total, kept=kept, total=values.numel())
