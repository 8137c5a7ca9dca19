"""The quickstart notebook teaches next-token prediction, not copying the input.

``tests/test_readme.py`` runs the notebook end to end; this test reads its training loop
without running it (the loop trains for tens of seconds on 2 CPU cores).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def _code_cells() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def _model_calls_with_targets(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "model"
        and len(node.args) == 2
    ]


def test_the_toy_training_predicts_the_next_token():
    training = [cell for cell in _code_cells() if "loss.backward()" in cell]
    assert len(training) == 1, "expected one training cell"
    tree = ast.parse(training[0])
    calls = _model_calls_with_targets(tree)
    assert calls, "the training loop should call model(inputs, targets)"
    for call in calls:
        inputs, targets = (ast.unparse(arg) for arg in call.args)
        assert inputs != targets, f"model({inputs}, {targets}) trains the model to copy its input"
    # Run the cell's data lines (not the loop) and check the shift: targets[t] = inputs[t + 1].
    setup = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign) and "model" not in ast.unparse(node.value)
    ]
    namespace: dict = {"torch": torch, "config": type("C", (), {"vocab_size": 97})}
    exec(compile(ast.Module(body=setup, type_ignores=[]), "quickstart.ipynb", "exec"), namespace)
    inputs, targets = (namespace[ast.unparse(arg)] for arg in calls[0].args)
    assert inputs.shape == targets.shape
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


QUALITY_NOTEBOOK = NOTEBOOK.parent / "quality.ipynb"
QUALITY_REPORTS = NOTEBOOK.parents[1] / "benchmarks" / "results" / "quality"
NOTEBOOK_STUDIES = [  # the notebook's STUDY: every committed tiny report drawn
    "study-tiny",
    "study-tiny-long",
    "study-tiny-embedding-lr",
    "study-tiny-long-embedding-lr",
]


@pytest.mark.parametrize("study", NOTEBOOK_STUDIES)
def test_the_quality_notebook_draws_the_committed_report(monkeypatch, study):
    """The quality notebook runs on each committed study report as it is (no training): its
    figures hold every method of the report, and its own check of the best learning rates
    passes."""
    path = QUALITY_REPORTS / f"{study}.json"
    monkeypatch.chdir(QUALITY_NOTEBOOK.parent)  # where Jupyter starts it
    cells = json.loads(QUALITY_NOTEBOOK.read_text())["cells"]
    default = 'STUDY = "study-tiny"'
    assert default in "".join(cells[1]["source"])  # the line a reader edits to switch
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]).replace(default, f"STUDY = {study!r}")
            exec(compile(source, "quality.ipynb", "exec"), namespace)
    report = json.loads(path.read_text())
    assert namespace["report"] == report
    swept = [m for m, spec in report["study"]["methods"].items() if spec["lr_from"] is None]
    assert set(namespace["best"]) == set(swept)  # every sweep finished and was checked
    (sweep_axes,) = namespace["sweep_figure"].axes
    assert len(sweep_axes.get_legend().get_texts()) == len(swept)
    ablations = [row for row in report["table"] if row.get("group") == "ablation"]
    (ablation_axes,) = namespace["ablation_figure"].axes
    assert len(ablation_axes.patches) == len(ablations)
    import matplotlib.pyplot as plt

    plt.close("all")
