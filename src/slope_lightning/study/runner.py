"""Run a study's plan: each run a normal ``slope-lightning fit``, resumable, with a marker.

For every run of the plan, in order:

* ``result.json`` in the run's folder means it is finished (it is written last, atomically,
  after the run's numbers were read): it is not run again. A marker made with other
  arguments than the study now gives is an error, never silently reused. A study with a
  ``records_dir`` also keeps a copy of each marker there (the small file to commit), and a
  run whose record is there is finished even with no run folder: the study continues on
  another machine, or in another session, from what is committed.
* Otherwise, if the folder holds a checkpoint of an interrupted attempt, the run resumes
  from it (``--ckpt_path last``: exact resume, in the same version directory); if it holds
  no checkpoint, it is cleared and the run starts afresh.
* The fit runs through a :data:`Launcher`: a subprocess of ``python -m slope_lightning.cli``
  (the default: one process per run, as a user would type it) or in-process (the CLI passes
  its own ``main``). Its output goes to the run's ``fit.log``.
* Exit status 0: the run's logs are read (TensorBoard scalars, ``config.yaml``), its export is
  evaluated on the validation split (``eval``: it chooses the learning rate) and on the test
  split (``test_eval``: it reports; None when ``data.test_fraction`` is 0), overall and per
  source (see :mod:`~slope_lightning.study.evaluate`), and ``result.json`` is written. A run
  stopped by a non-finite loss is a result too (``"status": "diverged"``: that learning rate
  is too high). Exit 130 stops the study (Ctrl-C); any other failure is recorded, the study
  goes on, and it ends with :class:`StudyIncomplete`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from slope_lightning.checkpoints import find_resume_checkpoint
from slope_lightning.study.config import FORMAT, RunSpec, StudyConfig
from slope_lightning.study.evaluate import Evaluator
from slope_lightning.study.selection import choose
from slope_lightning.utils import atomic_write

logger = logging.getLogger(__name__)

#: Exit status of an interrupted fit (the CLI's, and a shell's for SIGINT).
INTERRUPTED = 130


class StudyIncomplete(RuntimeError):
    """Some runs failed; the message lists them and where their output is."""


class StaleRunError(ValueError):
    """A finished run's marker records other arguments than the study now gives."""


@dataclass(frozen=True)
class LaunchResult:
    """How one ``fit`` ended: its exit status and its ``error: ...`` line, if any."""

    returncode: int
    error: str | None = None


#: Runs ``slope-lightning <args>`` (``args[0] == "fit"``), writing its output to the log file.
Launcher = Callable[[list[str], Path], LaunchResult]


def _last_error_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    return lines[-1] if lines else None


def subprocess_launcher(args: list[str], log_file: Path) -> LaunchResult:
    """Run ``python -m slope_lightning.cli <args>`` in a fresh process (same interpreter and
    working directory), its stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "slope_lightning.cli", *args]
    with log_file.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    text = log_file.read_text(encoding="utf-8", errors="replace")
    return LaunchResult(result.returncode, _last_error_line(text))


class _Tee(io.TextIOBase):
    """Writes to several text streams (the console and a run's log)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def in_process_launcher(main: Callable[[list[str]], int]) -> Launcher:
    """A launcher that calls the CLI's ``main`` in this process (faster: no interpreter start
    and imports per run; a crash of one run ends the study, which then resumes). Its
    ``error:`` line (stderr) goes to the console and to the run's log."""

    def launch(args: list[str], log_file: Path) -> LaunchResult:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a", encoding="utf-8") as log:
            log.write(f"$ slope-lightning {' '.join(args)}  (in-process)\n")
            captured = io.StringIO()
            with contextlib.redirect_stderr(_Tee(sys.stderr, log, captured)):
                code = main(args)
        return LaunchResult(code, _last_error_line(captured.getvalue()))

    return launch


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run in this invocation of the study."""

    spec: RunSpec
    state: str  # "done" (finished before), "finished", "diverged", "failed"
    detail: str = ""


def read_marker(spec: RunSpec) -> dict[str, Any] | None:
    """The run's ``result.json`` (or, without its run folder, its copy under the study's
    ``records_dir``), or None if the run is not finished.

    Raises:
        StaleRunError: the marker records other fit arguments than ``spec`` (the study file
            changed since the run): delete the run's folder (and its record) to run it again.
    """
    path = spec.marker if spec.marker.is_file() else spec.record
    if path is None or not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # never happens to an atomic write; treat it as unfinished
    if list(result.get("args", [])) != list(spec.args):
        stale = f"{spec.root}" + (f" and {spec.record}" if spec.record is not None else "")
        raise StaleRunError(
            f"{path} was made with other fit arguments than the study now gives "
            f"(recorded: {result.get('args')}; now: {list(spec.args)}); delete {stale} to "
            "run it again with the new ones, or restore the study file"
        )
    return dict(result)


def keep_record(spec: RunSpec, result: dict[str, Any]) -> None:
    """Copy a finished run's marker to its record under ``records_dir`` (if the study keeps
    records and it is not there yet): the small file to commit."""
    if spec.record is not None and not spec.record.is_file():
        atomic_write(spec.record, json.dumps(result, indent=1) + "\n")


def _version_dir(root: Path) -> Path | None:
    """The run's TensorBoard version directory (the highest ``version_N`` with a config)."""
    found = []
    for path in root.glob("version_*"):
        suffix = path.name.removeprefix("version_")
        if suffix.isdigit() and (path / "config.yaml").is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard events, ``tag -> [(step, value)]`` sorted by
    step; a step logged twice (after a resume from an earlier checkpoint) keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    for event_file in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series = by_tag.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                if event.step not in series or event.wall_time >= series[event.step][0]:
                    series[event.step] = (event.wall_time, float(event.value))
    return {
        tag: [(step, value) for step, (_, value) in sorted(series.items())]
        for tag, series in by_tag.items()
    }


def tokens_of(config: dict[str, Any]) -> int | None:
    """Training tokens of a run from its resolved config: max_steps × batch × seq_len ×
    accumulation × devices × nodes (None when the devices are not a plain count)."""
    trainer, data = config.get("trainer", {}), config.get("data", {})
    devices = trainer.get("devices", 1)
    if isinstance(devices, list):
        devices = len(devices)
    if not isinstance(devices, int) or isinstance(devices, bool):
        return None
    factors = (
        trainer.get("max_steps"),
        data.get("batch_size"),
        data.get("seq_len"),
        trainer.get("accumulate_grad_batches", 1),
        devices,
        trainer.get("num_nodes", 1),
    )
    if not all(isinstance(f, int) and f > 0 for f in factors):
        return None
    return math.prod(factors)


_DIVERGED = re.compile(r"non-finite|NaN|nan/inf", re.IGNORECASE)


def collect(
    spec: RunSpec, status: str, wall_s: float, resumed: bool, evaluator: Evaluator | None
) -> dict[str, Any]:
    """The run's numbers, read from its folder: what ``result.json`` holds."""
    log_dir = _version_dir(spec.root)
    if log_dir is None:
        raise FileNotFoundError(
            f"{spec.root} holds no version_N/config.yaml: the fit wrote no logs"
        )
    config = yaml.safe_load((log_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    scalars = read_scalars(log_dir)
    curves = {
        tag: series
        for tag, series in scalars.items()
        if tag in ("train/loss", "val/loss") or tag.startswith(("val/ppl", "pretrained/"))
    }
    logged = {tag: series[-1][1] for tag, series in curves.items() if series}
    export = log_dir / "export"
    evaluation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    if status == "finished" and evaluator is not None:
        evaluation = evaluator.evaluate(export, config, "validation")
        if Evaluator.has_test_split(config):
            test = evaluator.evaluate(export, config, "test")
    return {
        "format": FORMAT,
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "args": list(spec.args),
        "status": status,
        "log_dir": str(log_dir),
        "steps": int(config.get("trainer", {}).get("max_steps") or 0),
        "last_step": max((s[-1][0] for s in curves.values() if s), default=0),
        "tokens": tokens_of(config),
        "wall_s": wall_s,
        "resumed": resumed,
        "logged": logged,
        "eval": evaluation,
        "test_eval": test,
        "curves": curves,
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_one(spec: RunSpec, launcher: Launcher, evaluator: Evaluator | None) -> RunOutcome:
    """Run (or resume) one unfinished run and write its marker if it ends with a result."""
    args = list(spec.args)
    resumed = False
    if spec.root.exists():
        if find_resume_checkpoint(spec.root, []) is not None:
            args.append("--ckpt_path=last")
            resumed = True
            logger.info("%s: resuming the interrupted run from its checkpoint", spec.run_id)
        else:
            logger.info("%s: no checkpoint of the earlier attempt; starting afresh", spec.run_id)
            shutil.rmtree(spec.root)
    spec.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = launcher(args, spec.root / "fit.log")
    wall_s = time.perf_counter() - started
    if result.returncode == INTERRUPTED:
        raise KeyboardInterrupt(f"{spec.run_id} was interrupted; run the study again to resume")
    if result.returncode == 0:
        status = "finished"
    elif result.returncode == 1 and result.error is not None and _DIVERGED.search(result.error):
        status = "diverged"  # a result: this learning rate is too high
    else:
        return RunOutcome(
            spec,
            "failed",
            f"exit {result.returncode}: {result.error or 'see ' + str(spec.root / 'fit.log')}",
        )
    record = collect(spec, status, wall_s, resumed, evaluator)
    atomic_write(spec.marker, json.dumps(record, indent=1) + "\n")  # last: the run is done
    keep_record(spec, record)
    # a finished run's log can still hold an earlier attempt's interruption: no detail then
    return RunOutcome(spec, status, (result.error or "") if status == "diverged" else "")


def run_study(
    study: StudyConfig,
    launcher: Launcher = subprocess_launcher,
    evaluator: Evaluator | None = None,
    on_outcome: Callable[[RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run every unfinished run of ``study``, in plan order; finished ones are skipped.

    The plan grows as the study goes: once a method's sweep has finished, its refine runs
    (the sweep's best lr and its better neighbour on every seed) are planned; once they have
    finished, its lr is chosen and the ``lr_from`` methods that follow it are planned. A
    refine run that is a sweep run is that run (same folder, same marker). A failed run is
    not retried in the same invocation.

    Returns:
        One outcome per run, in the order they were run or found finished.

    Raises:
        StaleRunError: a finished run's marker records other arguments (before anything runs).
        KeyboardInterrupt: a run was interrupted (the study stops; run it again to resume).
    """
    evaluator = evaluator if evaluator is not None else Evaluator(study)
    seen: dict[str, RunOutcome] = {}
    while True:
        results = finished_results(study)  # the stale check, before anything runs
        choices = choose(study, results)
        plan = study.plan(choices)
        total = study.planned_count(choices)
        for spec in plan:
            if spec.run_id not in seen and (found := read_marker(spec)) is not None:
                keep_record(spec, found)  # a run finished before the study kept records
                seen[spec.run_id] = RunOutcome(spec, "done")
                if on_outcome is not None:
                    on_outcome(seen[spec.run_id])
        todo = [spec for spec in plan if spec.run_id not in seen]
        if not todo:
            break
        spec = todo[0]
        logger.info("study %s: run %d/%d %s", study.name, len(seen) + 1, total, spec.run_id)
        outcome = run_one(spec, launcher, evaluator)
        logger.info("study %s: %s %s %s", study.name, spec.run_id, outcome.state, outcome.detail)
        seen[spec.run_id] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
    return list(seen.values())


def finished_results(study: StudyConfig) -> list[dict[str, Any]]:
    """The markers of the study's finished runs, in plan order (the plan of the learning-rate
    choices these very results give).

    Raises:
        StaleRunError: a marker records other arguments than the study now gives.
    """
    results: list[dict[str, Any]] = []
    while True:
        plan = study.plan(choose(study, results))
        found = [marker for spec in plan if (marker := read_marker(spec)) is not None]
        if len(found) == len(results):
            return found
        results = found
