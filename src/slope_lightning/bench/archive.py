"""Bring a GPU check home: unpack the one archive that ``scripts/gpu_check.sh`` leaves under
``$OUT`` into ``benchmarks/results/<tag>/`` and render its tables, plots and an index on CPU.

The GPU machine is lent for minutes and only a few files come back from it, so it writes
JSON and markdown only, all packed into one ``tar.gz``; everything that needs matplotlib or
time is done here, afterwards::

    python -m slope_lightning.bench unpack gpu-check.tar.gz   # -> benchmarks/results/gpu-<device>/

What the archive holds (each part of the check adds its files as it finishes):

- ``machine.json``: GPU, driver, torch, CUDA, cuSPARSELt and Triton versions;
- ``parts.tsv``: one line per part: name, exit code (124/137: timed out), seconds, budget,
  the limit it ran under (the budget clamped to the time left) and why it was skipped;
- ``smoke.json``: the torch-primitive smoke checks (``scripts/gpu_smoke.py``);
- ``<table>.json`` / ``<table>.md``: the benchmark tables
  (:class:`~slope_lightning.bench.common.ResultsTable`), possibly incomplete after a timeout;
- ``summary.txt``: the call's summary (also left next to the archives under ``$OUT``);
- ``logs/<part>.log``, ``pytest/<test file>.xml`` (junit), and whatever else a part wrote.

The check runs in two calls (``scripts/gpu_check.sh --call 1|2``), each with its own
archive, ``gpu-check-call<N>.tar.gz``; unpack each (the second goes to ``gpu-<device>-call2``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from slope_lightning.bench.common import markdown_table, plot_table, render_markdown
from slope_lightning.utils import atomic_write

logger = logging.getLogger(__name__)

#: Exit codes of ``timeout``: 124 when the part ran out of time, 137 when it had to be killed.
TIMEOUT_CODES = (124, 137)


def _checked_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's members, refusing any that could write outside the destination.

    Raises:
        ValueError: an absolute path, a ``..`` component, or a link or device file.
    """
    members = archive.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"refusing archive member {member.name!r}: it leaves the directory")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"refusing archive member {member.name!r}: not a file or directory")
    return members


def extract(archive: Path, dest: Path) -> None:
    """Extract a (gzipped) tar archive into ``dest``, plain files and directories only.

    Raises:
        ValueError: a member that is a link or points outside ``dest``.
        tarfile.ReadError: not a tar archive.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        members = _checked_members(tar)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: belt and braces
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; the members were checked above
            tar.extractall(dest, members=members)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_tag(directory: Path, archive: Path) -> str:
    """``gpu-<device>`` from the archive's ``machine.json`` (e.g. ``gpu-nvidia-h200``), with
    ``-call2`` for the check's second call, else the archive's name: one directory per
    machine and call, which a newer check of them replaces."""
    facts = _read_json(directory / "machine.json")
    if isinstance(facts, dict) and facts.get("gpu"):
        call = facts.get("call", 1)
        suffix = f"-call{call}" if call != 1 else ""
        return "gpu-" + _slug(str(facts["gpu"]).removeprefix("NVIDIA ")) + suffix
    return _slug(archive.name.split(".")[0])


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not valid JSON (a part that died)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_table(document: Any) -> bool:
    return isinstance(document, dict) and {"rows", "columns", "info"} <= set(document)


def render_tables(directory: Path, plot: bool = True) -> list[str]:
    """Re-render ``<table>.md`` (and ``<table>.png`` with ``plot``) from every table JSON.

    Returns the table names, sorted. Files that are not tables (``machine.json``,
    ``smoke.json``, ``autotune.json``) are left alone.
    """
    names = []
    for path in sorted(directory.glob("*.json")):
        document = _read_json(path)
        if not _is_table(document):
            continue
        name = path.stem
        text = render_markdown(
            name,
            document["info"],
            document["rows"],
            document["columns"],
            bool(document.get("complete", True)),
        )
        atomic_write(directory / f"{name}.md", text)
        if plot and document["rows"]:
            plot_table(directory / f"{name}.png", name, document)
        names.append(name)
    return names


def how_it_ended(rc: str) -> str:
    """A part's exit code in words: ``ok``, ``timed out``, ``skipped`` or ``failed (rc N)``."""
    if rc == "skipped":
        return "skipped (no time left)"
    if not rc.lstrip("-").isdigit():
        return f"unknown ({rc})"
    code = int(rc)
    return "ok" if code == 0 else "timed out" if code in TIMEOUT_CODES else f"failed (rc {code})"


def _parts(directory: Path) -> list[dict[str, Any]]:
    """``parts.tsv`` as rows: part, how it ended, seconds, budget, the limit it ran under and
    a note (why a part was skipped)."""
    path = directory / "parts.tsv"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        fields = [*line.split("\t"), "", "", ""]  # missing trailing fields read as ""
        if not fields[0] or fields[0] == "part":
            continue
        part, rc, seconds, budget, limit, note = fields[:6]
        rows.append(
            {
                "part": part,
                "ended": f"skipped ({note})" if rc == "skipped" and note else how_it_ended(rc),
                "seconds": seconds,
                "budget_s": budget,
                "limit_s": limit,
                "note": note,
            }
        )
    return rows


def _smoke_rows(directory: Path) -> list[dict[str, Any]]:
    """``smoke.json``'s checks: name, PASS/FAIL/INFO, seconds and the first 200 characters."""
    checks = _read_json(directory / "smoke.json")
    if not isinstance(checks, list):
        return []
    return [
        {
            "check": c.get("check", "?"),
            "status": c.get("status", "?"),
            "seconds": c.get("seconds", ""),
            "detail": str(c.get("detail", "")).replace("|", "/")[:200],
        }
        for c in checks
        if isinstance(c, dict)
    ]


def render_index(directory: Path, tables: list[str]) -> Path:
    """Write ``index.md``: the machine, how each part ended, the smoke checks, the tables."""
    lines = [f"# GPU check: {directory.name}", ""]
    facts = _read_json(directory / "machine.json")
    if isinstance(facts, dict):
        lines += [f"- {key}: {value}" for key, value in facts.items()] + [""]
    parts = _parts(directory)
    if parts:
        columns = ["part", "ended", "seconds", "budget_s", "limit_s", "note"]
        lines += ["## Parts", "", markdown_table(parts, columns), ""]
    smoke = _smoke_rows(directory)
    if smoke:
        columns = ["check", "status", "seconds", "detail"]
        lines += ["## Smoke checks", "", markdown_table(smoke, columns), ""]
    if tables:
        lines += ["## Tables", ""]
        for name in tables:
            document = _read_json(directory / f"{name}.json") or {}
            state = "" if document.get("complete", True) else " (incomplete: timed out)"
            lines.append(f"- [{name}]({name}.md): {len(document.get('rows', []))} rows{state}")
        lines.append("")
    path = directory / "index.md"
    atomic_write(path, "\n".join(lines))
    return path


def unpack(
    archive: Path,
    out_root: Path = Path("benchmarks/results"),
    tag: str | None = None,
    plot: bool = True,
) -> Path:
    """Unpack ``archive`` into ``out_root/<tag>`` and render its tables, plots and index.

    Args:
        archive: the ``tar.gz`` that ``scripts/gpu_check.sh`` wrote under ``$OUT``.
        out_root: where results live in the repository.
        tag: the directory's name; default :func:`default_tag` (``gpu-<device>``). An
            existing directory of that name is replaced: it holds the older check.
        plot: draw a PNG per table (needs matplotlib; skipped with a warning without it).

    Returns:
        The directory the results are in.

    Raises:
        FileNotFoundError: no such archive.
        ValueError: the archive holds a link or a path outside its directory.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"no archive at {archive}")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=out_root))
    try:
        extract(archive, staging)
        target = out_root / (tag or default_tag(staging, archive))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tables = render_tables(target, plot=plot)
    render_index(target, tables)
    logger.info("unpacked %s into %s (%d tables)", archive, target, len(tables))
    return target
