"""Deprecated: the old home of the fault-handling pieces, kept for one release.

``slope_lightning.faults.X`` (in Python and in a YAML ``class_path``) still works and warns
with a DeprecationWarning naming the new path: the callbacks moved to
:mod:`slope_lightning.callbacks` (``slope_lightning.callbacks.CrashCheckpoint``,
``slope_lightning.callbacks.NonFiniteGuard``, ``NonFiniteError``), safe checkpoint loading and
finding a run's checkpoints to :mod:`slope_lightning.checkpoints`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: Each old name and the module that holds it now.
MOVED: dict[str, str] = {
    "CrashCheckpoint": "slope_lightning.callbacks",
    "NonFiniteGuard": "slope_lightning.callbacks",
    "NonFiniteError": "slope_lightning.callbacks",
    **{
        name: "slope_lightning.checkpoints"
        for name in (
            "CHECKPOINTS_DIRNAME",
            "CRASH_DIRNAME",
            "SHARDED_METADATA",
            "CheckpointError",
            "SafeCheckpointIO",
            "checkpoint_step",
            "find_resume_checkpoint",
            "is_sharded_checkpoint",
            "load_checkpoint_file",
            "run_checkpoints",
            "run_version",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = f"{MOVED[name]}.{name}"
    warnings.warn(
        f"{__name__}.{name} moved to {new}; the old path goes away in the next release: "
        f"import (or give class_path) {new}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(MOVED[name]), name)
