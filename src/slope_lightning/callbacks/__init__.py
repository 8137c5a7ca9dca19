"""The Lightning callbacks of slope-lightning, one file per callback, named for it (as
Lightning's own ``callbacks/`` folder is laid out); every one is
``slope_lightning.callbacks.X`` in Python and in a YAML ``class_path``.

SLoPe and its schedules:

- :class:`SLoPe` (``slope.py``): make any LightningModule SLoPe-sparse when the trainer starts.
- :class:`MaskScheduler` (``mask_scheduler.py``): re-derive the transposed mask M_C on a
  schedule, and log it.
- :class:`LazyLoRA` (``lazy_lora.py``): switch the low-rank adapters on late in training.
- :class:`InitFromPretrained` (``init_from_pretrained.py``): start from pretrained dense
  weights, pruned one-shot.
- :class:`TokenThroughput` (``throughput.py``): tokens per second.

The baseline 2:4 training methods (each named like its twin in :mod:`slope_lightning.baselines`):
:class:`SRSTE` (``srste.py``), :class:`TransposableSparse` (``transposable.py``),
:class:`OneShotPrune` (``oneshot.py``).

Faults: :class:`NonFiniteGuard` (``non_finite_guard.py``), :class:`CrashCheckpoint`
(``crash_checkpoint.py``).

No callback file imports another. How they coordinate (one training method per run; convert
the model before others look at it; who owns the M_C schedule) is written once in
:mod:`slope_lightning.callbacks.shared`; every use of Lightning internals is in
:mod:`slope_lightning.callbacks.lightning_internals`.

They act through hooks only and work with any LightningModule: one whose model was sparsified
with :func:`slope_lightning.sparsify` (in its ``__init__`` or ``configure_model``), or any
module at all with the :class:`SLoPe` callback. On a module without sparse layers (the dense
baseline under the same config) MaskScheduler and LazyLoRA say once that they are idle and
do nothing. Console messages come from global rank 0 only.
"""

from slope_lightning.callbacks.crash_checkpoint import CrashCheckpoint
from slope_lightning.callbacks.init_from_pretrained import InitFromPretrained
from slope_lightning.callbacks.lazy_lora import HIDDEN_SIZE_ATTRIBUTES, LazyLoRA, hidden_size_of
from slope_lightning.callbacks.mask_scheduler import MaskScheduler
from slope_lightning.callbacks.non_finite_guard import NonFiniteError, NonFiniteGuard
from slope_lightning.callbacks.oneshot import OneShotPrune
from slope_lightning.callbacks.shared import MaskScheduleOwner, Schedule, TrainingMethod
from slope_lightning.callbacks.slope import SLoPe
from slope_lightning.callbacks.srste import SRSTE
from slope_lightning.callbacks.throughput import TokenThroughput
from slope_lightning.callbacks.transposable import TransposableSparse

__all__ = [
    "HIDDEN_SIZE_ATTRIBUTES",
    "SRSTE",
    "CrashCheckpoint",
    "InitFromPretrained",
    "LazyLoRA",
    "MaskScheduleOwner",
    "MaskScheduler",
    "NonFiniteError",
    "NonFiniteGuard",
    "OneShotPrune",
    "SLoPe",
    "Schedule",
    "TokenThroughput",
    "TrainingMethod",
    "TransposableSparse",
    "hidden_size_of",
]
