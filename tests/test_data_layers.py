"""The data package's layers: preparation and streams import without Lightning, and only
``TextDataModule`` (loaded on first use) brings it in. Checked in a fresh interpreter, since
this test process has long imported Lightning."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import json, sys

    def lightning_modules():
        tops = {"lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities"}
        return sorted({m.split(".")[0] for m in sys.modules} & tops)

    import slope_lightning.data
    import slope_lightning.data.artifacts
    import slope_lightning.data.corpus
    import slope_lightning.data.prepare
    import slope_lightning.data.streams
    import slope_lightning.data.tokenizer
    from slope_lightning.data import ResumableSampler, prepare_tokens
    before = lightning_modules()
    listed = "TextDataModule" in dir(slope_lightning.data)
    from slope_lightning.data import TextDataModule
    import lightning.pytorch as pl
    print(json.dumps({
        "before": before,
        "listed": listed,
        "after": "lightning" in sys.modules,
        "is_datamodule": issubclass(TextDataModule, pl.LightningDataModule),
        "module": TextDataModule.__module__,
    }))
    """
)


def test_data_imports_lightning_only_for_the_datamodule() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["before"] == [], f"imported without need: {found['before']}"
    assert found["listed"]
    assert found["after"] and found["is_datamodule"]
    assert found["module"] == "slope_lightning.data.datamodule"


def test_unknown_names_raise_attribute_error() -> None:
    import slope_lightning.data as data

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        _ = data.NoSuchThing  # type: ignore[attr-defined]
    assert (
        data.TextDataModule
        is __import__("slope_lightning.data.datamodule", fromlist=["TextDataModule"]).TextDataModule
    )
