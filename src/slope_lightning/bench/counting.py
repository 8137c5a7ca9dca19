"""Exact byte counts the memory benchmarks share: the tensors autograd saves for backward
(:class:`StorageCounter`, the one counter of saved activations: ``peak``, ``sharded`` and
``plan`` use it), a group of modules' state on this rank, and which sparse kernels a model ran.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from slope_lightning.baselines import TransposableSparseLinear
from slope_lightning.sparse import SparseLinear
from slope_lightning.sparse.dtensor import local_part


class StorageCounter:
    """The distinct storages autograd saves for backward inside a ``with`` block, on real,
    meta or fake tensors alike; :meth:`bytes_excluding` counts them.

    Each piece of memory is counted once: a storage is known by its Python object (torch
    keeps one per storage, so a view, a reshape or a tensor saved twice shares it), and the
    whole storage is counted, since a saved view keeps all of it alive. The counter holds the
    storages it notes, so no id is reused while it counts (and their memory stays allocated
    until the counter is dropped). Model state is left out when counting, not when noting:
    pass the model's parameters and buffers to :meth:`bytes_excluding` *after* the forward,
    since a SparseLinear re-derives M_C in each training forward and saves the new tensor,
    which is then the layer's own (model state, not an activation). Only
    ``save_for_backward`` is seen: tensors a custom autograd Function keeps as plain ``ctx``
    attributes, or a checkpointed block's input, are not (:meth:`add` notes those).

    Example:
        >>> x = torch.randn(4, 4, requires_grad=True)
        >>> with StorageCounter() as saved:
        ...     y = (x * x).sum()
        >>> saved.bytes_excluding([])  # x saved twice by mul, counted once
        64
        >>> saved.bytes_excluding([x])  # x as model state: no activation left
        0
    """

    def __init__(self) -> None:
        self._storages: dict[int, torch.UntypedStorage] = {}  # id(storage) -> storage, held
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.add, self._unpack)

    def add(self, tensor: Tensor) -> Tensor:
        """Note ``tensor``'s storage; return the tensor unchanged (counting must not change
        what backward sees)."""
        storage = tensor.untyped_storage()
        self._storages[id(storage)] = storage
        return tensor

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    def bytes_excluding(self, state: Iterable[Tensor]) -> int:
        """Bytes of the noted storages that none of ``state`` uses. Pass the model's
        parameters and buffers (:func:`state_tensors`) *after* the forward: a SparseLinear
        re-derives M_C in each training forward and saves the new one, which is then the
        layer's (model state)."""
        excluded = {id(t.untyped_storage()) for t in state}
        return sum(s.nbytes() for key, s in self._storages.items() if key not in excluded)

    def __enter__(self) -> StorageCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def state_tensors(model: nn.Module) -> list[Tensor]:
    """``model``'s parameters and buffers: what model state counts, and what
    :meth:`StorageCounter.bytes_excluding` leaves out of the saved activations."""
    return [*model.parameters(), *model.buffers()]


def kernels_used(model: nn.Module) -> str:
    """Which GEMMs the sparse layers ran: SLoPe's backend (``auto``'s choice once made) and
    the transposable layers' kernels; ``"dense"`` for a model without sparse layers."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            names.add(module.backend.running.name)
        elif isinstance(module, TransposableSparseLinear):
            names.update(module.chosen_backends)
    return ",".join(sorted(names)) or "dense"


def module_state_bytes(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """This rank's bytes of ``modules``' parameters, buffers, gradients and optimizer state
    (a DTensor counted by its local shard, as :func:`memory_report` does)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Tensor | None) -> None:
        nonlocal total
        if tensor is None:
            return
        local = local_part(tensor)
        if local.numel() and local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            total += local.numel() * local.element_size()

    for module in modules:
        for param in module.parameters():
            add(param)
            add(param.grad)
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor):
                    add(value)
        for buffer in module.buffers():
            add(buffer)
    return total
