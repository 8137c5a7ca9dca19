"""Exact byte counts the memory benchmarks share: the tensors autograd saves for backward, the
storages that model state already counts, a group of modules' state on this rank, and which
sparse kernels a model ran.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from slope_lightning.baselines import TransposableSparseLinear
from slope_lightning.sparse import SparseLinear
from slope_lightning.sparse.dtensor import local_part


class SavedTensorCounter:
    """Counts the bytes of the tensors autograd saves for backward inside a ``with`` block.

    Each piece of memory is counted once: tensors are keyed by their untyped storage (a view,
    a reshape or a tensor saved twice shares one), and the whole storage is counted, since
    a saved view keeps all of it alive. Storages in ``exclude`` (e.g. the model's parameters
    and buffers, already counted as model state) are left out. Only ``save_for_backward`` is
    seen: tensors a custom autograd Function keeps as plain ``ctx`` attributes are not.

    Example:
        >>> x = torch.randn(4, 4, requires_grad=True)
        >>> with SavedTensorCounter() as saved:
        ...     y = (x * x).sum()
        >>> saved.total  # x saved twice by mul, counted once
        64
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude: set[int] = set(exclude or ())
        self.storages: dict[int, int] = {}  # storage data_ptr -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key != 0 and key not in self.exclude and tensor.device.type != "meta":
            self.storages[key] = max(self.storages.get(key, 0), storage.nbytes())
        return tensor  # saved as usual: counting must not change what backward sees

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    @property
    def total(self) -> int:
        """Bytes of distinct saved storages."""
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def state_storages(model: nn.Module) -> set[int]:
    """Storage addresses of ``model``'s parameters and buffers (what model state counts)."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


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
