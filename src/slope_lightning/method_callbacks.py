"""Deprecated: the old home of the baseline methods' callbacks, kept for one release.

``slope_lightning.method_callbacks.X`` (in Python and in a YAML ``class_path``) still works
and warns with a DeprecationWarning naming the new path, ``slope_lightning.callbacks.X``
(:class:`~slope_lightning.callbacks.SRSTE`,
:class:`~slope_lightning.callbacks.TransposableSparse`,
:class:`~slope_lightning.callbacks.OneShotPrune`).
"""

from __future__ import annotations

from slope_lightning.utils import deprecated_module_getattr

#: Each old name and the module that holds it now.
MOVED: dict[str, str] = {
    "SRSTE": "slope_lightning.callbacks",
    "TransposableSparse": "slope_lightning.callbacks",
    "OneShotPrune": "slope_lightning.callbacks",
}

__getattr__ = deprecated_module_getattr(__name__, MOVED)
