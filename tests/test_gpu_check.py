"""scripts/gpu_check.sh: its parts, budgets and commands (through --list), and a dry run of
both calls on this CPU (emulated backend, tiny shapes) that must leave the same archives and
summary a GPU run leaves. The device is lent for minutes, once: a typo, a missing file or a
budget that does not add up must fail here, not there."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

from slope_lightning.bench import archive, layers, methods
from slope_lightning.bench.__main__ import build_parser
from slope_lightning.sparse.backends import BackendName

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
RESERVE, GRACE = 10, 5
WALLS = {1: 300, 2: 270}
CALL_1 = ["facts", "smoke", "pytest-gpu-step", "pytest-gpu-backends", "pytest-transposable",
          "pytest-kernel-ops", "pytest-kernels", "layers", "step"]  # fmt: skip
CALL_2 = ["facts", "memory", "inference", "step-compiled"]


def listed(*flags: str) -> dict[int, list[tuple[str, int, list[str]]]]:
    """``gpu_check.sh --list``: per call, (part, budget, command words)."""
    text = subprocess.run(
        ["bash", str(SCRIPT), "--list", *flags], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    calls: dict[int, list[tuple[str, int, list[str]]]] = {}
    for line in text.splitlines():
        if line.startswith("# call") and "wall" in line:
            current = calls.setdefault(int(line.split()[2].rstrip(":")), [])
        elif line and not line.startswith("#"):
            name, budget, command = line.split("\t")
            current.append((name, int(budget), shlex.split(command)))
    return calls


def test_each_call_runs_its_parts_by_value_within_its_wall():
    calls = listed("--call", "1 2")
    assert [name for name, _, _ in calls[1]] == CALL_1
    assert [name for name, _, _ in calls[2]] == CALL_2
    for call, parts in calls.items():
        assert sum(budget for _, budget, _ in parts) + RESERVE + GRACE <= WALLS[call]
    assert WALLS[1] <= 300  # call 1 alone is worth the machine start


@pytest.mark.parametrize("flags", [(), ("--dry-run",)], ids=["gpu", "dry-run"])
def test_every_command_uses_options_and_names_that_exist(flags):
    for parts in listed("--call", "1 2", *flags).values():
        for name, _, words in parts:
            if words[:3] == ["python", "-m", "slope_lightning.bench"]:
                args = build_parser().parse_args(words[3:])
                assert args.plot is False, f"{name}: PNGs are drawn on CPU, not on the device"
                assert isinstance(getattr(torch, args.dtype), torch.dtype)
                for preset in {args.preset, *args.presets.split(",")}:
                    methods.bench_config(preset)
                for backend in args.backends.split(","):
                    BackendName.parse(backend)
                if args.models:
                    layers.shapes_of(args.models.split(","))
            elif words[:3] == ["python", "-m", "pytest"]:
                assert (ROOT / words[-1]).is_file() and "-m" in words and "gpu" in words
                assert any(w.startswith("--junitxml=") for w in words) and "-rA" in words
            elif words[0] == "python":
                assert (ROOT / words[1]).is_file()


def test_the_gpu_run_measures_the_widths_and_precision_that_matter():
    parts = {name: words for name, _, words in listed("--call", "1 2")[1]}
    layer_args = build_parser().parse_args(parts["layers"][3:])
    widths = {int(v) for shape in layer_args.shapes.split(",") for v in shape.split("x")}
    assert {4096, 14336} <= widths and "fwd+bwd+update" in layer_args.phases
    step_args = build_parser().parse_args(parts["step"][3:])
    assert step_args.precision == "bf16-mixed"
    assert methods.bench_config(step_args.preset).d_model >= 4096


def test_the_check_refuses_an_unknown_call():
    done = subprocess.run(["bash", str(SCRIPT), "--call", "3"], capture_output=True, text=True)
    assert done.returncode == 2 and "choose 1 or 2" in done.stderr


@pytest.mark.slow
def test_a_dry_run_of_both_calls_leaves_the_archives_and_summary_of_a_gpu_run(tmp_path):
    """About 4-5 minutes on 2 shared cores: every part of both calls runs for real."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu-check-call1.tar.gz",
        "gpu-check-call2.tar.gz",
        "summary.txt",
    ]
    summary = (out / "summary.txt").read_text()
    assert "call 1 (DRY RUN on CPU)" in summary and "call 2 (DRY RUN on CPU)" in summary
    assert "= 295 s <= wall 300 s" in summary and "= 260 s <= wall 270 s" in summary
    assert not list(tmp_path.glob("slope-gpu-check.*"))  # scratch directories removed
    for call, names in ((1, CALL_1), (2, CALL_2)):
        target = archive.unpack(
            out / f"gpu-check-call{call}.tar.gz", tmp_path / "results", plot=False
        )
        rows = [line.split("\t") for line in (target / "parts.tsv").read_text().splitlines()]
        assert [row[0] for row in rows[1:]] == names
        assert all(row[1] == "0" for row in rows[1:]), rows  # every part ran and succeeded
        facts = json.loads((target / "machine.json").read_text())
        assert facts["call"] == call and facts["dry_run"] is True
        assert {"pytest", "c_compiler", "python_h", "cusparselt", "triton"} <= set(facts)
        assert (target / "summary.txt").is_file() and (target / "index.md").is_file()
        tables = {p.stem for p in target.glob("*.json")} - {"machine", "smoke"}
        for table in tables:
            assert json.loads((target / f"{table}.json").read_text())["complete"] is True
        if call == 1:
            assert {"layers-cpu-reference", "step-cpu-reference"} <= tables
            smoke = {
                c["check"]: c["status"] for c in json.loads((target / "smoke.json").read_text())
            }
            assert smoke["fused_adamw_bumps_version"] == "FACT"
            assert "FAIL" not in smoke.values() and smoke["slope_step_overhead"] == "INFO"
            for file in ("test_gpu_step", "test_gpu_backends", "test_kernels"):
                ElementTree.parse(target / "pytest" / f"{file}.xml")  # junit XML, complete
        else:
            assert {"memory", "memory-peak-cpu-count", "inference-cpu-reference",
                    "step-compiled-cpu-reference"} <= tables  # fmt: skip
            peaks = json.loads((target / "memory-peak-cpu-count.json").read_text())["rows"]
            assert {row["dtype"] for row in peaks} == {"bf16-mixed"}
