"""The README's quickstart, the quickstart notebook, and the quality numbers of the README and
the quality study page (tests/test_docs.py runs every example of README.md and docs/)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
QUALITY = README.parent / "docs" / "quality.md"


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


def test_the_quality_section_quotes_the_committed_report():
    """Every "mean ± std" of the quality study page (and of the README's status table) is a
    number of the study's report (perplexities to 0.1, paired ratios to 0.001), and every
    per-seed perplexity too."""
    import json
    import re

    section = QUALITY.read_text()
    status = README.read_text()
    status = status[status.index("## Status") : status.index("## Documentation")]
    report = json.loads(
        (README.parent / "benchmarks" / "results" / "quality" / "study-tiny.json").read_text()
    )
    rows = [row for row in report["table"] if row.get("seeds")]
    known = {f"{row['val_ppl']:.1f} ± {row['val_ppl_std']:.1f}" for row in rows}
    known |= {
        f"{row['paired_ratio']:.3f} ± {row['paired_ratio_std']:.3f}"
        for row in rows
        if row["method"] != report["baseline"]
    }
    quoted = set(re.findall(r"\d+\.\d+ ± \d+\.\d+", section))
    assert quoted and quoted <= known, sorted(quoted - known)
    in_status = set(re.findall(r"\d+\.\d+ ± \d+\.\d+", status))
    assert in_status and in_status <= known, sorted(in_status - known)
    seeds = {f"{value:.1f}" for row in rows for value in row["per_seed_ppl"].values()}
    for line in section.splitlines():
        if line.startswith("| ") and re.search(r"\d\.\d / \d", line):
            per_seed = re.findall(r"(\d+\.\d) / (\d+\.\d) / (\d+\.\d)", line)
            assert per_seed and set(per_seed[0]) <= seeds, line
