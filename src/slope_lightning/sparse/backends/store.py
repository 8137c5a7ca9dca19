"""Where ``auto`` keeps its measured decisions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from slope_lightning.utils import atomic_write

logger = logging.getLogger(__name__)


class DecisionStore:
    """``auto``'s measured decisions: in memory, and in ``path`` (JSON) when one is given.

    Keys name the device, the torch version, the operand shape, the dtype and the token
    bucket, so a file carried to another machine or torch is re-measured, not trusted.
    Written atomically; a corrupt file is ignored (re-measured) with a warning.

    Args:
        path: the JSON file (None: memory only, for the life of the process).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._table: dict[str, Any] = {}
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("ignoring unreadable auto decisions in %s: %s", self.path, error)
                loaded = {}
            self._table = loaded if isinstance(loaded, dict) else {}

    def get(self, key: str) -> Any:
        return self._table.get(key)

    def put(self, key: str, value: Any) -> None:
        self._table[key] = value
        if self.path is not None:
            atomic_write(self.path, json.dumps(self._table, indent=1, sort_keys=True))

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "in memory"
