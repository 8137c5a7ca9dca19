"""No host-to-device copy in the hot path: what an M_C refresh of a SparseLinear
dispatches, logged on the meta device (a stand-in for CUDA, where such a copy
synchronises the host with the GPU)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from slope_lightning.sparse import SparseLinear
from slope_lightning.sparse.masks import nm_positions

META = torch.device("meta")


class HostToDeviceCopies(TorchDispatchMode):
    """Records every op that reads a CPU tensor and returns a tensor elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o)]
        from_host = any(t.device.type == "cpu" and t.dim() > 0 for t in inputs)
        if from_host and any(o.device.type != "cpu" for o in outputs):
            shapes = [tuple(t.shape) for t in inputs if t.device.type == "cpu"]
            self.copies.append(f"{func} {shapes}")
        return out


def test_an_mc_refresh_copies_nothing_from_the_host_after_the_first():
    weight_t = torch.randn(64, 32, device=META)  # W_Rᵀ, pruned 2:4 along d_out
    nm_positions(weight_t, 2, 4)  # first use on this device: the lookup table is copied once
    with HostToDeviceCopies() as log:
        for _ in range(3):
            nm_positions(weight_t, 2, 4)
    assert log.copies == []


def test_a_layers_mc_refresh_copies_nothing_from_the_host():
    """What the training forward runs at every step under the default interval."""
    layer = SparseLinear(64, 32, device=META)
    layer.refresh_transpose_mask(with_stats=False)  # first use: per-device lookup tables
    with HostToDeviceCopies() as log:
        for _ in range(3):
            layer.refresh_transpose_mask(with_stats=False)
    assert log.copies == []
