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


def _quoted_study_numbers() -> tuple[set[str], set[str]]:
    """Every "mean ± std" of the committed quality reports (perplexities to 0.1 on the split
    each reports and on validation, paired ratios and the gap along training to 0.001), and
    every per-seed perplexity to 0.1."""
    import json

    known: set[str] = set()
    seeds: set[str] = set()
    for path in sorted((README.parent / "benchmarks" / "results" / "quality").glob("study-*.json")):
        report = json.loads(path.read_text())
        rows = [row for row in report["table"] if row.get("seeds")]
        for row in rows:
            for key in ("ppl", "val_ppl"):
                if key in row:
                    known.add(f"{row[key]:.1f} ± {row[key + '_std']:.1f}")
            if row["method"] != report["baseline"]:
                known.add(f"{row['paired_ratio']:.3f} ± {row['paired_ratio_std']:.3f}")
            seeds |= {f"{value:.1f}" for value in row.get("per_seed_ppl", {}).values()}
        for points in (report.get("gap") or {}).values():
            known |= {f"{mean:.3f} ± {std:.3f}" for _, mean, std, _ in points}
    return known, seeds


def test_the_quality_section_quotes_the_committed_report():
    """Every "mean ± std" of the quality study page (and of the README's status table) is a
    number of a committed study report, and every per-seed perplexity too."""
    import re

    section = QUALITY.read_text()
    status = README.read_text()
    status = status[status.index("## Status") : status.index("## Documentation")]
    known, seeds = _quoted_study_numbers()
    quoted = set(re.findall(r"\d+\.\d+ ± \d+\.\d+", section))
    assert quoted and quoted <= known, sorted(quoted - known)
    in_status = set(re.findall(r"\d+\.\d+ ± \d+\.\d+", status))
    assert in_status and in_status <= known, sorted(in_status - known)
    for line in section.splitlines():
        if line.startswith("| ") and re.search(r"\d\.\d / \d", line):
            per_seed = re.findall(r"(\d+\.\d) / (\d+\.\d) / (\d+\.\d)", line)
            assert per_seed and set(per_seed[0]) <= seeds, line
