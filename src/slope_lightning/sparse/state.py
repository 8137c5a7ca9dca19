"""What a SparseLinear's checkpoint holds besides its tensors: the extra state (updates since
the last M_C refresh, N, M) and the checks of the packed masks a load brings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slope_lightning.sparse.layout import NMLayout


def read_extra_state(state: Any, current: int, layout: NMLayout, name: str) -> int:
    """The updates since the last M_C refresh that ``state`` (a SparseLinear's extra state as
    saved, in any form this library ever wrote) holds; ``current`` where it holds none.

    Raises:
        ValueError: the state is not (updates, N, M), or was saved from another N:M pattern
            than ``layout``'s (``name`` names the layer).
    """
    if isinstance(state, dict):  # checkpoints written before the tensor form
        updates, pattern = int(state.get("updates_since_refresh", 0)), None
    elif not isinstance(state, Tensor | list | tuple):
        # torch.distributed.checkpoint's placeholder for an extra state absent from a
        # partial load (Lightning loads a full checkpoint into an FSDP2 model one tensor
        # at a time): nothing to restore here; the masks are still checked.
        updates, pattern = current, None
    else:
        values = [int(v) for v in torch.as_tensor(state).flatten().tolist()]
        if len(values) != 3:
            raise ValueError(
                f"layer {name!r}: extra state {values} is not (updates, N, M); the "
                "checkpoint was not written by this version of slope-lightning"
            )
        updates, pattern = values[0], (values[1], values[2])
    if pattern is not None and pattern != (layout.n, layout.m):
        raise ValueError(
            f"layer {name!r}: the checkpoint holds a {pattern[0]}:{pattern[1]} sparse "
            f"weight, this model is {layout.n}:{layout.m}; build the model with "
            f"n={pattern[0]}, m={pattern[1]} (model.sparsity.n / .m) to load it"
        )
    return updates


def check_index(index: Tensor, layout: NMLayout, label: str, name: str) -> None:
    """Raise unless ``index`` decodes to N strictly increasing offsets < M per group
    (``index`` may be a shard of rows, e.g. this rank's under FSDP2)."""
    layout = NMLayout(index.shape[0], layout.cols, layout.n, layout.m)
    positions = layout.positions(index)  # (rows, G, n)
    ok = bool((positions < layout.m).all()) and bool((positions.diff(dim=-1) > 0).all())
    if not ok:
        raise ValueError(
            f"layer {name!r}: the loaded {label} is not a valid {layout.n}:{layout.m} "
            "pattern (offsets out of range or repeated within a group); the checkpoint is "
            "corrupt or from another pattern: load an earlier checkpoint or re-export"
        )
