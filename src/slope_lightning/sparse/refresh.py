"""When a SparseLinear re-derives M_C from W_R: the one rule, written here once.

M_C (N:M of W_R along d_out) must follow W_R, which every optimizer step changes:

1. **A MaskScheduler callback, when attached, owns the schedule.** It sets every layer's
   ``transpose_mask_interval`` to None and refreshes M_C at the optimizer steps it selects
   (it reads ``trainer.global_step``); the layers decide nothing.
2. **``transpose_mask_interval=1``, the default (the paper's accuracy runs): every training
   forward re-derives M_C from the W_R it sees.** Nothing is counted, so it is right whatever
   updates the values: a fused, foreach or plain optimizer, a ``.data`` assignment, a load.
   With gradient accumulation every micro-batch of a step sees the same W_R and so derives
   the same M_C. It costs one pass over the values per forward, small next to the GEMMs.
3. **``transpose_mask_interval=k > 1``: M_C is re-derived at the first training forward
   after k optimizer steps, counted by the step hook of**
   :func:`~slope_lightning.sparse.follow_optimizer` **(the only step counter).** A layer cannot
   see a step by itself (a fused optimizer moves no version counter), so a training forward
   of a layer that no hook reports to raises rather than train with a stale M_C.
4. **``None``: only when** :meth:`SparseLinear.refresh_transpose_mask` **is called.**

Under FSDP2 (values sharded by rows between steps) the forward sees a gathered copy of the
parameters that is freed after it and gathered again for the backward, so a M_C written
there would not reach the backward: once the step hook has seen the sharded values, M_C is
re-derived from the shards right after the step instead (2. after every step, 3. after
every k-th), the same M_C since it is the same W_R. Before that (the first step), or with no
hook, the forward hands the M_C it derived straight to its backward, so the backward is
exact either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from slope_lightning.sparse.dtensor import is_dtensor
from slope_lightning.sparse.sharded import rederive_col_index, refresh_col_index

if TYPE_CHECKING:
    from slope_lightning.sparse.linear import SparseLinear


@dataclass
class RefreshCounter:
    """A layer's side of the rule: what the step hook has told it.

    Attributes:
        steps: optimizer steps reported since M_C was last derived (kept in checkpoints).
        counted: a step hook reports this layer's optimizer steps (rule 3 needs one).
        between_steps: the hook has seen the values sharded (FSDP2): M_C is re-derived there.
    """

    steps: int = 0
    counted: bool = False
    between_steps: bool = False


def check_interval(interval: int | None, name: str) -> None:
    """Raise unless ``interval`` is a positive number of optimizer steps or None.

    Raises:
        ValueError: ``interval`` is below 1.
    """
    if interval is not None and interval < 1:
        raise ValueError(
            f"layer {name!r}: transpose_mask_interval must be a positive number of "
            f"optimizer steps or None (manual), got {interval}"
        )


def transpose_mask_for_training(layer: SparseLinear) -> Tensor:
    """The M_C that this training forward's backward uses, re-derived first where the rule
    says so (see the module docstring).

    Where M_C is held as a parameter (FSDP2's layout, see
    :meth:`SparseLinear.hold_masks_as_parameters`) the layer's tensor may be a gathered copy
    that FSDP2 gathers again from the shards for the backward: the fresh tensor, not the
    layer's, goes to the backward.

    Raises:
        RuntimeError: ``transpose_mask_interval`` > 1 and no step hook reports to the layer.
    """
    interval, counter = layer.transpose_mask_interval, layer.refresh_counter
    if interval is None or counter.between_steps:
        return layer.col_index
    if interval > 1:
        if not counter.counted:
            raise RuntimeError(
                f"layer {layer.name!r}: transpose_mask_interval={interval} re-derives M_C "
                f"every {interval} optimizer steps, but no optimizer reports its steps to "
                "this layer (a fused optimizer moves no version counter a layer could "
                "read); call slope_lightning.sparse.follow_optimizer(model, optimizer) "
                "before training (SLoPeModule and the SLoPe callback do), or use "
                "transpose_mask_interval=1 (re-derived at every training forward, nothing "
                f"to count) or a MaskScheduler(every={interval}) callback"
            )
        if counter.steps < interval:
            return layer.col_index
    fresh, _ = rederive_col_index(layer)
    return fresh


def count_optimizer_step(layer: SparseLinear) -> None:
    """Count one optimizer step of ``layer``'s values (the step hook's call); under FSDP2,
    re-derive M_C from the shards when it is due (a collective on every rank)."""
    counter = layer.refresh_counter
    counter.counted = True
    counter.steps += 1
    if is_dtensor(layer.values):
        counter.between_steps = True
        interval = layer.transpose_mask_interval
        if interval is not None and counter.steps >= interval:
            refresh_col_index(layer, with_stats=False)
