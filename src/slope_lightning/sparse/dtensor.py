"""DTensor helpers: what this process holds of a tensor sharded by FSDP2, and the collectives
a row-sharded SparseLinear needs between steps.

Under FSDP2 (``fully_shard``) a SparseLinear's values are a DTensor sharded by rows (d_out)
between steps, and FSDP's gathered plain tensor inside the forward and backward. The packed
masks shard with them once held as frozen parameters
(:meth:`~slope_lightning.sparse.SparseLinear.hold_masks_as_parameters`). Adapters that
LazyLoRA adds after ``fully_shard`` are sharded the same way by :func:`shard_like` and
gathered for each forward by :func:`gathered_for_compute`. Every function here works on a
build of torch without ``torch.distributed`` too (nothing is a DTensor then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor, nn

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


def shard_like(param: nn.Parameter, reference: DTensor) -> nn.Parameter:
    """``param`` (the same on every rank) sharded by rows on ``reference``'s mesh and
    placements, as FSDP2 shards ``reference``: for a parameter created after ``fully_shard``
    (LazyLoRA's adapters), which FSDP2 does not manage. Each rank keeps its rows of its own
    copy; nothing is communicated."""
    from torch.distributed.tensor import distribute_tensor

    sharded = distribute_tensor(
        param.detach(), reference.device_mesh, reference.placements, src_data_rank=None
    )
    return nn.Parameter(sharded, requires_grad=param.requires_grad)


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gathered_for_compute(param: Tensor) -> Tensor:
    """A parameter that :func:`shard_like` sharded, whole for one forward, as FSDP2 gathers
    its own: an all-gather, whose backward reduce-scatters the gradient to the shards,
    averaged over every rank of the mesh (FSDP2's data-parallel mean). Any other tensor is
    returned as it is. A collective under FSDP2: every rank runs the same forward."""
    if not is_dtensor(param):
        return param
    from torch.distributed.tensor import Partial

    mesh = param.device_mesh
    whole = param.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGradient.apply(whole, 1.0 / mesh.size())
