"""Deprecated: the old home of the fault-handling pieces, kept for one release.

``slope_lightning.faults.X`` (in Python and in a YAML ``class_path``) still works and warns
with a DeprecationWarning naming the new path: the callbacks moved to
:mod:`slope_lightning.callbacks` (``slope_lightning.callbacks.CrashCheckpoint``,
``slope_lightning.callbacks.NonFiniteGuard``, ``NonFiniteError``), safe checkpoint loading and
finding a run's checkpoints to :mod:`slope_lightning.checkpoints`.
"""

from __future__ import annotations

from slope_lightning.utils import deprecated_module_getattr

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

__getattr__ = deprecated_module_getattr(__name__, MOVED)
