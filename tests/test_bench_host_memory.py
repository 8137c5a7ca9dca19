"""``slope-lightning bench host-memory``: peak host memory per rank at the start of a real
2-process FSDP2 fit, run through the console script as users run it (tiny preset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from console import console
from slope_lightning.bench.host_memory import BUILDS, COLUMNS

PRETRAINED = ("ordinary+pretrained", "meta_init+pretrained")


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    """Both builds from the dense file the benchmark writes: the pair whose difference is
    robust on ``tiny`` (the ordinary build holds the whole file and a pruned copy on every
    rank); without a file the two differ by a few MiB either way at this size."""
    out = tmp_path_factory.mktemp("host-memory")
    args = ["bench", "host-memory", "--preset", "tiny", "--world-size", "2", "--batch", "1"]
    args += ["--builds", ",".join(PRETRAINED), "--out", str(out), "--no-plot"]
    result = console(*args, cwd=out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((out / "host-memory-tiny-w2.json").read_text())
    return result.stdout, document, out


@pytest.mark.slow
def test_host_memory_prints_and_writes_one_row_per_build_and_rank(pretrained_run):
    stdout, document, out = pretrained_run
    assert document["complete"] and document["columns"] == COLUMNS
    rows = document["rows"]
    assert [(r["build"], r["rank"]) for r in rows] == [(b, r) for b in PRETRAINED for r in (0, 1)]
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert row["preset"] == "tiny" and row["world"] == 2
        assert 0 < row["imports_MiB"] < row["peak_MiB"] <= row["peak_after_step_MiB"]
        assert row["peak_above_imports_MiB"] == pytest.approx(row["peak_MiB"] - row["imports_MiB"])
    info = document["info"]
    assert info["command"].startswith("python -m slope_lightning.bench host-memory")
    assert {"torch", "date", "includes", "weights_file", "dense_weights_MiB"} <= set(info)
    markdown = (out / "host-memory-tiny-w2.md").read_text()
    assert "| preset | build | world | rank | imports_MiB | peak_MiB |" in markdown
    assert "| tiny | meta_init+pretrained | 2 | 1 |" in markdown
    assert "| tiny | meta_init+pretrained | 2 | 1 |" in stdout  # the table is the output


@pytest.mark.slow
def test_meta_init_reads_only_its_rows_and_peaks_below_the_ordinary_build(pretrained_run):
    _, document, _ = pretrained_run
    rows = {(r["build"], r["rank"]): r for r in document["rows"]}
    whole_file = document["info"]["dense_weights_MiB"]
    for rank in (0, 1):
        ordinary, meta = rows[("ordinary+pretrained", rank)], rows[("meta_init+pretrained", rank)]
        assert ordinary["vs_ordinary"] == 1.0
        assert meta["peak_MiB"] < ordinary["peak_MiB"]
        assert meta["vs_ordinary"] == pytest.approx(meta["peak_MiB"] / ordinary["peak_MiB"])
        # Both let the file go once it is read: no page of it is mapped at the first batch.
        assert ordinary["weights_mapped_MiB"] == 0 and meta["weights_mapped_MiB"] == 0
        assert whole_file > 0


def test_host_memory_refuses_an_unknown_build_before_writing_anything(tmp_path):
    out = tmp_path / "results"
    args = ["bench", "host-memory", "--builds", "ordinary,sharded", "--out", str(out)]
    result = console(*args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "error: --builds 'ordinary,sharded': choose from " + ", ".join(BUILDS) in result.stderr
    assert not out.exists()  # no empty table, and no fit started
