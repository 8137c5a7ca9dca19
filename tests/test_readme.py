"""The README's plain-PyTorch example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_plain_pytorch_example_runs():
    text = README.read_text()
    section = text[text.index("## SLoPe in plain PyTorch") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (32, 256)


def test_quickstart_is_exactly_two_commands():
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert commands == [
        "pip install -e . && slope-lightning fit --config configs/tiny.yaml",
        'pip install -e ".[test]" && python -m pytest -q',
    ]


def test_quickstart_notebook_runs():
    import json

    notebook = json.loads((README.parent / "notebooks" / "quickstart.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert (namespace["after"] - namespace["before"]).abs().max() < 1e-4
