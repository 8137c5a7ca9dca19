"""DTensor helpers: what this process holds of a tensor sharded by FSDP2, and the collectives
a row-sharded SparseLinear needs between steps.

Under FSDP2 (``fully_shard``) a SparseLinear's values are a DTensor sharded by rows (d_out)
between steps, and FSDP's gathered plain tensor inside the forward and backward. The packed
masks shard with them once held as frozen parameters
(:meth:`~slope_lightning.sparse.SparseLinear.hold_masks_as_parameters`). Every function here
works on a build of torch without ``torch.distributed`` too (nothing is a DTensor then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.tensor import DTensor


def chunk_size(size: int, parts: int) -> int:
    """Rows per part when ``size`` rows are split in ``parts`` as ``torch.chunk`` (and FSDP2)
    splits them: the ceiling of size / parts (the last parts may be short or empty)."""
    return -(-size // parts)


def is_dtensor(tensor: Tensor | None) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (torch.distributed may be missing from the build)."""
    if tensor is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """What this process holds of ``tensor``: a DTensor's local shard (FSDP2 parameters,
    their gradients and optimizer state), any other tensor itself.

    The one such helper of the library (memory reports, checkpoints and sharded refreshes
    use it)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """All of ``tensor``: a DTensor gathered (a collective), any other tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def row_shard(values: DTensor) -> tuple[ProcessGroup, int, int] | None:
    """(process group, rows per rank, this rank's index) of a DTensor sharded by rows on one
    mesh dimension and replicated on the others (FSDP2, HSDP); None for other placements."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(values.placements)
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or placements[shard_dims[0]] != Shard(0):
        return None
    dim = shard_dims[0]
    if not all(isinstance(p, Replicate) for i, p in enumerate(placements) if i != dim):
        return None
    mesh = values.device_mesh
    chunk = chunk_size(values.shape[0], mesh.size(dim))
    return mesh.get_group(dim), chunk, mesh.get_local_rank(dim)


def all_gather_columns(part: Tensor, group: ProcessGroup, width: int) -> Tensor:
    """Concatenate every rank's ``part`` (rows, its columns) along the columns, in rank
    order, trimmed to ``width`` columns: torch.chunk's layout, the last parts may be short."""
    world = torch.distributed.get_world_size(group)
    chunk = chunk_size(width, world)
    padded = part.new_zeros(part.shape[0], chunk)
    padded[:, : part.shape[1]] = part
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded.contiguous(), group=group)
    sizes = [max(0, min(chunk, width - r * chunk)) for r in range(world)]
    return torch.cat([g[:, :size] for g, size in zip(gathered, sizes, strict=True)], dim=1)


def local_rows(tensor: Tensor, name: str) -> slice:
    """The rows (dim 0) of the full ``tensor`` that this process holds: all of them for a
    plain tensor, this rank's row shard of a DTensor sharded by rows (FSDP2, HSDP).

    Raises:
        ValueError: a DTensor placed otherwise (the message names ``name``).
    """
    if not is_dtensor(tensor):
        return slice(0, tensor.shape[0])
    shard = row_shard(tensor)
    if shard is None:
        raise ValueError(
            f"{name}: placed {tensor.placements}; only sharding by rows (Shard(0), FSDP2) is "
            "supported here"
        )
    _, chunk, index = shard
    start = min(index * chunk, tensor.shape[0])
    return slice(start, start + local_part(tensor).shape[0])
