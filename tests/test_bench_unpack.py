"""The device check brings its results home: one archive, unpacked and rendered on CPU
(``python -m slope_lightning.bench unpack``), and the script that makes it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from slope_lightning.bench import archive, common
from slope_lightning.bench.__main__ import main

ROOT = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INFO = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cusparselt": 800}


def fake_check(directory: Path) -> Path:
    """What scripts/gpu_check.sh leaves in its scratch directory after a run whose layers
    part timed out and whose compiled step had no time left."""
    directory.mkdir(parents=True)
    (directory / "logs").mkdir()
    (directory / "logs" / "layers.log").write_text("Terminated\n")
    machine = {"gpu": "NVIDIA H200", "driver": "580.1", "torch": "2.11.0+cu130"}
    (directory / "machine.json").write_text(json.dumps(machine))
    (directory / "parts.tsv").write_text(
        "part\trc\tseconds\tbudget_s\tlimit_s\n"
        "facts\t0\t6\t20\t20\n"
        "layers\t124\t50\t50\t50\n"
        "step-compiled\tskipped\t0\t240\t0\n"
    )
    smoke = [
        {"check": "cslt_search", "status": "PASS", "detail": "alg_id=3", "seconds": 0.4},
        {"check": "fused_adamw_bumps_version", "status": "FACT", "detail": "0 -> 0"},
    ]
    (directory / "smoke.json").write_text(json.dumps(smoke))
    columns = ["shape (out x in)", "backend", "dense/slope"]
    layers = common.ResultsTable("layers", directory, INFO, columns, "dense/slope")
    layers.add({"shape (out x in)": "4096x4096", "backend": "cusparselt", "dense/slope": 1.4})
    # never closed: the part was killed after its first row
    rows = [
        {"method": "dense", "speedup_vs_dense": 1.0},
        {"method": "slope", "speedup_vs_dense": 1.2},
    ]
    common.write_results(
        "step", directory, INFO, rows, ["method", "speedup_vs_dense"], "speedup_vs_dense",
        plot=False,
    )  # fmt: skip
    (directory / "autotune.json").write_text("{}")  # not a table: left alone
    tar_path = directory.parent / "gpu-check.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(directory, arcname=".")
    return tar_path


def test_unpack_puts_the_check_in_results_and_renders_it(tmp_path, capsys):
    tar_path = fake_check(tmp_path / "work")
    out = tmp_path / "results"
    main(["unpack", str(tar_path), "--out", str(out)])
    target = out / "gpu-h200"
    assert str(target) in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["gpu-h200"]  # no staging directory left
    assert (target / "logs" / "layers.log").is_file()
    index = (target / "index.md").read_text()
    for words in ("gpu: NVIDIA H200", "| layers | timed out |", "skipped (no time left)",
                  "| fused_adamw_bumps_version | FACT |", "[step](step.md): 2 rows",
                  "[layers](layers.md): 1 rows (incomplete: timed out)"):  # fmt: skip
        assert words in index, words
    assert "autotune" not in index
    assert "**Incomplete:**" in (target / "layers.md").read_text()
    assert "cusparselt: 800" in (target / "step.md").read_text()
    if not _has_matplotlib():
        return
    assert (target / "step.png").read_bytes().startswith(PNG_MAGIC)
    assert (target / "layers.png").read_bytes().startswith(PNG_MAGIC)


def test_unpack_replaces_an_older_check_of_the_same_machine(tmp_path):
    tar_path = fake_check(tmp_path / "work")
    out = tmp_path / "results"
    (out / "gpu-h200").mkdir(parents=True)
    (out / "gpu-h200" / "stale.md").write_text("old")
    target = archive.unpack(tar_path, out, plot=False)
    assert not (target / "stale.md").exists() and (target / "index.md").is_file()
    assert archive.unpack(tar_path, out, tag="second", plot=False) == out / "second"


def _evil_archive(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        if kind == "parent":
            member = tarfile.TarInfo("../escaped.txt")
            member.size = 2
            tar.addfile(member, io.BytesIO(b"hi"))
        else:
            member = tarfile.TarInfo("link")
            member.type = tarfile.SYMTYPE
            member.linkname = "/etc/passwd"
            tar.addfile(member)
    return path


@pytest.mark.parametrize("kind", ["parent", "symlink"])
def test_unpack_refuses_members_that_leave_the_directory(tmp_path, kind):
    tar_path = _evil_archive(tmp_path / f"{kind}.tar.gz", kind)
    out = tmp_path / "results"
    with pytest.raises(ValueError, match="refusing archive member"):
        archive.unpack(tar_path, out)
    assert not (tmp_path / "escaped.txt").exists()
    assert list(out.iterdir()) == []  # the staging directory is gone too


def test_unpack_needs_exactly_one_archive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["unpack", "--out", str(tmp_path)])
    assert "give one archive" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no archive"):
        archive.unpack(tmp_path / "missing.tar.gz", tmp_path)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_second_calls_archive_unpacks_next_to_the_first_not_over_it(tmp_path):
    first = fake_check(tmp_path / "a" / "check")
    second_dir = tmp_path / "b" / "check"
    second = fake_check(second_dir)
    machine = {"gpu": "NVIDIA H200", "call": 2}
    (second_dir / "machine.json").write_text(json.dumps(machine))
    (second_dir / "parts.tsv").write_text(
        "part\trc\tseconds\tbudget_s\tlimit_s\tnote\n"
        "step-compiled\tskipped\t0\t120\t0\tno C compiler or Python.h\n"
    )
    with tarfile.open(second, "w:gz") as tar:
        tar.add(second_dir, arcname=".")
    out = tmp_path / "results"
    assert archive.unpack(first, out, plot=False).name == "gpu-h200"
    target = archive.unpack(second, out, plot=False)
    assert target.name == "gpu-h200-call2" and (out / "gpu-h200").is_dir()
    assert "skipped (no C compiler or Python.h)" in (target / "index.md").read_text()
