"""The command tree of ``slope-lightning``: every subcommand with its one line of help, the
top-level ``--help``, and a subcommand name checked (with a "did you mean") before anything
runs."""

from __future__ import annotations

import difflib

from slope_lightning.cli_errors import DEBUG_ENV, ConfigError

#: Every subcommand, with the one line ``slope-lightning --help`` shows for it.
SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model: a new run in its own runs/<name>/version_N, or --ckpt_path last",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the held-out test split (data.test_fraction > 0)",
    "generate": "sample text from a checkpoint or an export",
    "study": "a quality study: methods x learning rates x seeds, each a fit, then one report",
    "bench": "benchmarks: memory, host-memory, layers, kernels, step, inference, runs, unpack",
    "fetch": "fetch a pretrained checkpoint and write its tokenizer.json",
}


def check_subcommand(argv: list[str]) -> str:
    """The subcommand that ``argv`` (without the program name) starts with.

    Raises:
        ConfigError: no subcommand, or an unknown one (the message names the closest one and
            lists them all).
    """
    if not argv:
        raise ConfigError(
            f"give a subcommand: {', '.join(SUBCOMMANDS)} (see slope-lightning --help)"
        )
    command = argv[0]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, list(SUBCOMMANDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown subcommand {command!r}; {hint}choose one of {', '.join(SUBCOMMANDS)} "
            "(slope-lightning --help says what each does)"
        )
    return command


def top_level_help() -> str:
    """What ``slope-lightning --help`` prints: every subcommand with one line, and the exit
    statuses."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: slope-lightning SUBCOMMAND [options]   (slope-lightning SUBCOMMAND --help)",
        "",
        "SLoPe 2:4 sparse pretraining with PyTorch Lightning.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()),
        "",
        "exit status: 0 success, 2 bad command line or config, 1 failure, 130 interrupted;",
        f"a failure prints one 'error:' line ({DEBUG_ENV}=1 shows its traceback).",
    ]
    return "\n".join(lines)
