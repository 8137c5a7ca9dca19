"""Quality studies: methods × learning rates × seeds at equal tokens, each run a normal
``slope-lightning fit``, then one report.

    slope-lightning study --config configs/studies/tiny.yaml              # run, then report
    slope-lightning study --config configs/studies/tiny.yaml --dry-run    # the plan and its state
    slope-lightning study --config configs/studies/tiny.yaml --report-only

* :mod:`~slope_lightning.study.config`: the study file and its plan of runs (the sweep, the
  refine of each method's best lrs on every seed, then the methods that follow a chosen lr);
* :mod:`~slope_lightning.study.selection`: the sweep, the refine and the choice of each
  method's learning rate, on the validation split;
* :mod:`~slope_lightning.study.runner`: runs the plan, resumable (a finished run has a
  ``result.json`` marker, written last, and is never run again; an interrupted one resumes
  from its checkpoint);
* :mod:`~slope_lightning.study.evaluate`: every run's export on the validation split (which
  chooses) and the held-out test split (which reports), overall and per source;
* :mod:`~slope_lightning.study.report`: the table, the LR sweep and the loss curves as
  markdown, JSON and PNG under ``benchmarks/results/quality/``: the numbers from
  :mod:`~slope_lightning.study.summary`, the text from :mod:`~slope_lightning.study.markdown`,
  the PNGs from :mod:`~slope_lightning.study.figures`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Callable

from slope_lightning.study.config import (
    LrChoice,
    MethodSpec,
    RunSpec,
    StudyConfig,
    StudyConfigError,
)
from slope_lightning.study.evaluate import Evaluator
from slope_lightning.study.report import summarize, write_report
from slope_lightning.study.runner import (
    Launcher,
    LaunchResult,
    RunOutcome,
    StaleRunError,
    StudyIncomplete,
    finished_results,
    in_process_launcher,
    read_marker,
    run_study,
    subprocess_launcher,
)
from slope_lightning.study.selection import best_learning_rates, choose, run_value
from slope_lightning.utils import machine_info

__all__ = [
    "Evaluator",
    "LaunchResult",
    "Launcher",
    "LrChoice",
    "MethodSpec",
    "RunOutcome",
    "RunSpec",
    "StaleRunError",
    "StudyConfig",
    "StudyConfigError",
    "StudyIncomplete",
    "best_learning_rates",
    "choose",
    "finished_results",
    "in_process_launcher",
    "machine_info",
    "read_marker",
    "run_study",
    "run_value",
    "study_command",
    "subprocess_launcher",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slope-lightning study",
        description=(
            "Run a quality study (methods x learning rates x seeds at equal tokens, each run "
            "a `slope-lightning fit`: a sweep, a refine of each method's best lrs on every "
            "seed, the choice on validation) and write its report, on the held-out test split. "
            "Finished runs are never run again; an interrupted study resumes where it stopped."
        ),
    )
    parser.add_argument("--config", required=True, help="the study file (configs/studies/*.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    mode.add_argument(
        "--report-only", action="store_true", help="write the report of the finished runs"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run each fit in this process (faster start; default: one subprocess per run)",
    )
    return parser


def study_command(args: list[str], fit_main: Callable[[list[str]], int] | None = None) -> int:
    """``slope-lightning study ...``: parse, run the plan, write the report.

    Args:
        args: the arguments after ``study``.
        fit_main: the CLI's ``main`` (for ``--in-process``; the CLI passes it).

    Returns:
        0 when every run finished (or diverged: a result) and the report was written.

    Raises:
        StudyConfigError: a bad command line or study file (exit status 2 from the CLI).
        StaleRunError: a finished run was made with other arguments than the file now gives.
        StudyIncomplete: some runs failed (the report of the others is written first).
        KeyboardInterrupt: interrupted; run the same command again to resume.
        SystemExit: ``--help`` (status 0).
    """
    parsed, unknown = _parser().parse_known_args(args)
    if unknown:
        raise StudyConfigError(f"study: unrecognized arguments {unknown}")
    study = StudyConfig.from_file(parsed.config)
    if parsed.dry_run:
        choices = choose(study, finished_results(study))
        plan = study.plan(choices)
        for spec in plan:
            state = "finished" if read_marker(spec) is not None else "to run"
            print(f"{spec.run_id:40s} {state:9s} slope-lightning {shlex.join(spec.args)}")
        waiting = study.planned_count(choices) - len(plan)
        if waiting:
            print(
                f"and {waiting} more runs at learning rates that the sweep and refine stages "
                "will choose"
            )
        return 0
    command = shlex.join(["slope-lightning", "study", *args])
    if not parsed.report_only:
        if parsed.in_process:
            if fit_main is None:
                raise StudyConfigError("study: --in-process needs the CLI's fit entry point")
            launcher: Launcher = in_process_launcher(fit_main)
        else:
            launcher = subprocess_launcher
        outcomes = run_study(study, launcher)
    else:
        outcomes = []
    results = finished_results(study)
    paths = write_report(study, results, machine_info(command))
    planned = study.planned_count(choose(study, results))
    finished = f"{len(results)} of {planned} runs finished"
    print(f"study {study.name}: {finished}; report: {paths['markdown']}")
    failed = [outcome for outcome in outcomes if outcome.state == "failed"]
    if failed:
        details = "; ".join(f"{o.spec.run_id} ({o.detail})" for o in failed)
        raise StudyIncomplete(
            f"{len(failed)} of {planned} runs failed: {details}; their output is "
            "in each run's fit.log; fix the cause and run the study again (finished runs are kept)"
        )
    return 0
