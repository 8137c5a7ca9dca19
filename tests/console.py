"""Running the real ``slope-lightning`` console script as a user does, and reading its one
``error:`` line: shared by every test of the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The console script installed beside this Python (``python -m slope_lightning.cli`` where
#: the package is not installed).
SCRIPT = Path(sys.executable).with_name("slope-lightning")


def console(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``slope-lightning *args`` in ``cwd``; its exit status and output, never raising."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "slope_lightning.cli"]
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def error_line(stderr: str) -> str:
    """The single ``error:`` line (asserting there is exactly one and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]
