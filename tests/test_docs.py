"""Every example in ``README.md`` and ``docs/`` runs, or says why it cannot.

- A fenced ```` ```python ```` block is executed as a script in its own process, in a fresh
  temporary directory (with a small trained-model export at ``runs/tiny/version_0/export``
  for the examples that load one), and must exit 0 within :data:`TIMEOUT_S`.
- A fenced ```` ```bash ```` / ```` ```console ```` block is read command by command: every
  ``slope-lightning`` command (also behind ``srun``, ``torchrun -m slope_lightning.cli`` or
  ``python -m slope_lightning.cli``) must parse without running: ``fit`` / ``validate`` /
  ``test`` with ``--print_config``, ``study`` with ``--dry-run``, and the other subcommands
  by their ``--help``, which must exit 0 and list every option the example uses. A command of
  any other program is an error unless the block is marked.
- A block that cannot run here is preceded by ``<!-- not run: REASON -->``, and the reason
  is shown as the test's skip message. Commands of ``slope-lightning`` in a marked shell block
  are still parsed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))

#: Seconds one Python example may take (the slowest, a Lightning fit, takes 15 to 45 s).
TIMEOUT_S = 240

#: ``<!-- not run: REASON -->`` right before a fence (blank lines allowed in between).
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w-]*)\s*$")

#: Subcommands checked by parsing their whole config without running.
PRINT_CONFIG = ("fit", "validate", "test")
#: Subcommands with an option that plans without running.
DRY_RUN = {"study": "--dry-run"}
#: A path the examples may read: a trained model's export, as ``fit`` writes it.
EXPORT = "runs/tiny/version_0/export"


@dataclass(frozen=True)
class Example:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, when the block is marked

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The fenced blocks of ``page`` in order, each with its ``not run`` marker if any."""
    found: list[Example] = []
    lines = page.read_text().splitlines()
    marker: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        note = NOT_RUN.match(line.strip())
        fence = FENCE.match(line)
        if note:
            marker = note.group("reason")
        elif fence:
            indent = fence.group("indent")
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"{page.relative_to(ROOT)}:{index + 1}: unclosed fence")
            body = [text.removeprefix(indent) for text in lines[index + 1 : end]]
            found.append(
                Example(page, index + 1, fence.group("language"), "\n".join(body) + "\n", marker)
            )
            marker = None
            index = end
        elif line.strip() and marker is not None:
            raise AssertionError(
                f"{page.relative_to(ROOT)}:{index + 1}: a 'not run' marker must come right "
                "before the code block it marks"
            )
        index += 1
    return found


ALL = [example for page in PAGES for example in examples(page)]
PYTHON = [example for example in ALL if example.language == "python"]
SHELL = [example for example in ALL if example.language in ("bash", "console", "sh", "shell")]


# --------------------------------------------------------------------------------------------
# The pages themselves
# --------------------------------------------------------------------------------------------


def test_the_pages_have_examples_of_every_kind():
    assert len(PYTHON) >= 8 and len(SHELL) >= 8, (len(PYTHON), len(SHELL))
    readme = {example.language for example in ALL if example.page.name == "README.md"}
    assert {"python", "bash"} <= readme


def test_every_not_run_marker_names_its_reason():
    for example in ALL:
        if example.not_run is not None:
            assert len(example.not_run.split()) >= 3, f"{example}: say why it cannot run"


def test_the_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_readme_links_into_docs_pages_that_exist():
    """mkdocs checks the links between docs pages; the README is not part of the site."""
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert len(links) >= 10, links
    for link in links:
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"


def test_every_docs_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in config, f"{page} is not in mkdocs.yml nav"


def test_the_api_reference_covers_the_public_modules():
    text = "".join(page.read_text() for page in (ROOT / "docs" / "reference").glob("*.md"))
    for module in ("slope_lightning", "slope_lightning.sparse", "slope_lightning.callbacks"):
        assert f"::: {module}\n" in text, module
    for module in ("slope_lightning.hf", "slope_lightning.models"):
        assert f"::: {module}\n" in text, module


def test_the_examples_name_callbacks_by_their_one_class_path():
    """Every callback is ``slope_lightning.callbacks.X``; the old module paths are gone from
    the documentation."""
    for page in PAGES:
        text = page.read_text()
        for old in ("slope_lightning.faults.", "slope_lightning.method_callbacks."):
            assert old not in text, f"{page.relative_to(ROOT)} still names {old}X"


# --------------------------------------------------------------------------------------------
# Python examples
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sparse Transformer exported with its tokenizer, laid out as ``fit`` does."""
    from slope_lightning import sparsify
    from slope_lightning.data import train_tokenizer
    from slope_lightning.data.corpus import Document
    from slope_lightning.export import export_model
    from slope_lightning.models import Transformer, TransformerConfig
    from slope_lightning.sparse import SparsityConfig

    root = tmp_path_factory.mktemp("export")
    text = "To be, or not to be, that is the question. The king is dead. " * 40
    tokenizer = train_tokenizer([Document("play", text, "plays")], 300)
    tokenizer.save(str(root / "tokenizer.json"))
    config = TransformerConfig(
        vocab_size=300, seq_len=64, n_layer=1, n_head=2, n_kv_head=1, d_model=32
    )
    model = Transformer(config)
    sparsity = SparsityConfig()
    sparsify(model, sparsity)
    export = root / EXPORT
    export_model(model, config, sparsity, export, tokenizer=root / "tokenizer.json")
    return export


def _python_cases() -> list:
    """One case per Python block; one that trains (a Lightning fit, or a training loop: 10 to
    40 s in a fresh process on 2 busy cores) is slow."""
    return [
        pytest.param(
            example,
            id=str(example),
            marks=[pytest.mark.slow]
            if re.search(r"pl\.Trainer|\.backward\(\)", example.code)
            else [],
        )
        for example in PYTHON
    ]


@pytest.mark.parametrize("example", _python_cases())
def test_the_python_example_runs(example: Example, tmp_path: Path, export_dir: Path):
    if example.not_run is not None:
        pytest.skip(f"not run: {example.not_run}")
    if EXPORT in example.code:
        target = tmp_path / EXPORT
        target.parent.mkdir(parents=True)
        target.symlink_to(export_dir, target_is_directory=True)
    script = tmp_path / "example.py"
    script.write_text(example.code)
    paths = [str(ROOT / "src"), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path for path in paths if path),
        "HF_HUB_OFFLINE": "1",  # an example must not need the network
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{example} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


# --------------------------------------------------------------------------------------------
# Shell examples
# --------------------------------------------------------------------------------------------


def shell_commands(example: Example) -> Iterator[list[str]]:
    """Each simple command of a shell block (``&&``, ``;`` and ``|`` split commands), as
    words; in a ``console`` block only the lines after a ``$`` prompt."""
    text = example.code.replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if example.language == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def slope_lightning_args(command: list[str]) -> list[str] | None:
    """The arguments of the ``slope-lightning`` command ``command`` runs, or None when it
    runs another program."""
    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
        command = command[1:]  # environment assignments
    if not command:
        return None
    if command[0] == "srun":
        return slope_lightning_args(command[1:])
    if command[0] == "slope-lightning":
        return command[1:]
    if command[0] in ("torchrun", "python", "python3") and "-m" in command:
        at = command.index("-m")
        if command[at + 1 : at + 2] == ["slope_lightning.cli"]:
            return command[at + 2 :]
    return None


def run_main(args: list[str]) -> tuple[int, str]:
    """``slope-lightning ARGS`` in this process: its exit status and what it printed."""
    from slope_lightning.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(args)
    return status, out.getvalue()


def check_parses(args: list[str]) -> None:
    """Parse ``slope-lightning ARGS`` without running it; raise AssertionError naming what
    does not parse."""
    assert args, "slope-lightning with no subcommand"
    subcommand = args[0]
    if subcommand in PRINT_CONFIG:
        status, output = run_main([*args, "--print_config"])
        assert status == 0, f"slope-lightning {shlex.join(args)} does not parse:\n{output}"
    elif subcommand in DRY_RUN:
        status, output = run_main([*args, DRY_RUN[subcommand]])
        assert status == 0, f"slope-lightning {shlex.join(args)} does not parse:\n{output}"
    else:
        status, output = run_main([subcommand, "--help"])
        assert status == 0, f"slope-lightning {subcommand} --help fails:\n{output}"
        for option in (arg.split("=")[0] for arg in args[1:] if arg.startswith("--")):
            assert re.search(rf"{re.escape(option)}\b", output), (
                f"slope-lightning {subcommand} has no option {option}:\n{output}"
            )


def _shell_cases() -> list:
    cases = []
    for example in SHELL:
        for command in shell_commands(example):
            cases.append(pytest.param(example, command, id=f"{example}:{shlex.join(command)}"))
    return cases


@pytest.mark.parametrize(("example", "command"), _shell_cases())
def test_the_shell_command_parses(example: Example, command: list[str], monkeypatch):
    args = slope_lightning_args(command)
    if args is None:
        assert example.not_run is not None, (
            f"{example}: `{shlex.join(command)}` is not a slope-lightning command, so the tests "
            "cannot check it: mark the block with <!-- not run: REASON -->"
        )
        pytest.skip(f"not run: {example.not_run}")
    monkeypatch.chdir(ROOT)  # the examples name configs/ relative to the repository
    check_parses(args)


def test_a_command_that_does_not_parse_is_caught(monkeypatch):
    """The check above can fail: a misspelt key, a missing config and an unknown option."""
    monkeypatch.chdir(ROOT)
    for args in (
        ["fit", "--config", "configs/tiny.yaml", "--model.sparsity.nn", "2"],
        ["fit", "--config", "configs/no-such.yaml"],
        ["generate", "export", "--no_such_option", "1"],
    ):
        with pytest.raises(AssertionError):
            check_parses(args)
