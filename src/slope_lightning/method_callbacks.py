"""Deprecated: the old home of the baseline methods' callbacks, kept for one release.

``slope_lightning.method_callbacks.X`` (in Python and in a YAML ``class_path``) still works
and warns with a DeprecationWarning naming the new path, ``slope_lightning.callbacks.X``
(:class:`~slope_lightning.callbacks.SRSTE`,
:class:`~slope_lightning.callbacks.TransposableSparse`,
:class:`~slope_lightning.callbacks.OneShotPrune`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

#: Each old name and the module that holds it now.
MOVED: dict[str, str] = {
    "SRSTE": "slope_lightning.callbacks",
    "TransposableSparse": "slope_lightning.callbacks",
    "OneShotPrune": "slope_lightning.callbacks",
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
