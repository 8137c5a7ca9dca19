"""Exact byte counts of model state: parameters, gradients, optimizer state, buffers, caches.

Activations are not counted (like the SLoPe paper's memory figures). Tensors that share
memory (tied weights, views) are counted once. Under FSDP2 the counts are per rank: a sharded
tensor counts its local shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slope_lightning.sparse.adapters import LowRankAdapter
from slope_lightning.sparse.dtensor import local_part
from slope_lightning.sparse.linear import SparseLinear

CATEGORIES: tuple[str, ...] = (
    "sparse values",
    "metadata",
    "dense parameters",
    "gradients",
    "optimizer state",
    "buffers",
    "caches",
)


@dataclass
class MemoryReport:
    """Bytes of model state by category; ``print(report)`` shows a table in MiB."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, int]:
        return {**self.bytes, "total": self.total}

    def __str__(self) -> str:
        width = max(len(c) for c in [*CATEGORIES, "total"])
        rows = [
            f"{name:<{width}}  {count / 2**20:>12.3f} MiB" for name, count in self.bytes.items()
        ]
        rows.append(f"{'total':<{width}}  {self.total / 2**20:>12.3f} MiB")
        return "\n".join(rows)


class _Counter:
    """Adds tensor sizes to categories, counting each piece of memory once."""

    def __init__(self) -> None:
        self.report = MemoryReport()
        self._seen: set[tuple[int, int, int]] = set()

    def add(self, category: str, tensor: Tensor | None) -> None:
        if tensor is None or not isinstance(tensor, Tensor):
            return
        tensor = local_part(tensor)
        if tensor.device.type == "meta":
            return
        key = (tensor.data_ptr(), tensor.numel(), tensor.element_size())
        if tensor.numel() == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.report.bytes[category] += tensor.numel() * tensor.element_size()


def _persistent_buffers(model: nn.Module) -> set[int]:
    """The ids of ``model``'s persistent buffers: those its state dict holds.

    Read through the public ``state_dict(keep_vars=True)``, which returns the buffers
    themselves (no copy) and leaves out the non-persistent ones; a buffer it does not hold
    is a cache. Not a collective under FSDP2, whose state dict holds the DTensor shards.
    """
    state = model.state_dict(keep_vars=True)
    return {id(value) for value in state.values() if isinstance(value, Tensor)}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                yield value


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the bytes of ``model``'s state (and ``optimizer``'s, if given), exactly.

    Counts are per process: a DTensor (a parameter sharded by FSDP2, its gradient and its
    optimizer state; SparseLinear's packed masks once held as parameters) is counted by its
    local shard, every other tensor in full (replicated buffers, and parameters FSDP2 does
    not manage, such as adapters added mid-run). Call it between steps, when FSDP2's
    gathered copies are freed.

    Categories: "sparse values" (kept weight values of SparseLinear layers and adapters' Lᵀ),
    "metadata" (packed mask offsets), "dense parameters" (everything else trainable),
    "gradients", "optimizer state", "buffers" (other persistent buffers) and "caches"
    (non-persistent buffers, and the kernel/inference caches derived from parameters that
    any module lists through a ``cached_tensors()`` method).
    """
    counter = _Counter()
    sparse_value_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            sparse_value_ids.add(id(module.values))
            counter.add("metadata", module.row_index)
            counter.add("metadata", module.col_index)
        elif isinstance(module, LowRankAdapter):
            sparse_value_ids.add(id(module.down_values))
            counter.add("metadata", module.down_index)
    for param in model.parameters():
        counter.add("sparse values" if id(param) in sparse_value_ids else "dense parameters", param)
    for param in model.parameters():
        counter.add("gradients", param.grad)
    if optimizer is not None:
        for tensor in _optimizer_tensors(optimizer):
            counter.add("optimizer state", tensor)
    persistent = _persistent_buffers(model)
    for module in model.modules():
        for buffer in module.buffers(recurse=False):
            counter.add("buffers" if id(buffer) in persistent else "caches", buffer)
        cached_tensors = getattr(module, "cached_tensors", None)
        if callable(cached_tensors):  # SparseLinear, TransposableSparseLinear
            for tensor in cached_tensors():
                counter.add("caches", tensor)
    return counter.report
