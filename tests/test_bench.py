"""The benchmark commands run and report what they claim (tiny shapes; numbers not asserted,
except exact memory counts)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from slope_lightning.bench import layers, memory, model
from slope_lightning.bench.__main__ import main

SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1, "seq_len": 32, "vocab_size": 128}


def test_sparse_layers_need_at_most_six_tenths_of_dense_model_state():
    rows = memory.layer_rows(shapes=((64, 128), (256, 64)), tokens=4)
    assert all(0.5 < row["ratio"] <= 0.6 for row in rows)


def test_layer_benchmark_compares_against_dense_in_the_same_run():
    rows = layers.layer_rows(shapes=((32, 64),), tokens=(16, 8), repeats=1)
    assert [(row["tokens"], row["phase"]) for row in rows] == [
        (16, "forward"),
        (16, "input-grad"),
        (16, "fwd+bwd"),
        (8, "forward"),
        (8, "input-grad"),
        (8, "fwd+bwd"),
    ]
    assert all(row["backend"] == "reference (CPU)" and row["slope/dense"] > 0 for row in rows)


def test_layer_benchmark_knows_the_projection_shapes_of_the_papers_models():
    assert layers.shapes_of(["gpt2-small"]) == [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    assert (14336, 4096) in layers.shapes_of(["llama-3-8b", "mistral-7b"])
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        layers.shapes_of(["gpt5"])


def test_a_backend_that_cannot_run_gets_a_row_saying_why():
    rows = layers.layer_rows(shapes=((32, 64),), tokens=8, repeats=1, backends=("cutlass+tiled",))
    assert rows[-1]["phase"] == "all" and "CUDA" in rows[-1]["note"]


def test_step_and_inference_benchmarks_cover_dense_and_slope():
    steps = model.step_rows("tiny", batch=2, repeats=1, **SMALL)
    assert [row["method"] for row in steps] == [
        "dense",
        "slope (reference)",
        "transposable (reference)",
    ]
    assert steps[0]["speedup_vs_dense"] == 1.0
    inference = model.inference_rows("tiny", prompt=8, new_tokens=2, repeats=1, **SMALL)
    assert [row["method"] for row in inference] == [
        "dense",
        "slope merged r=0.00%",
        "slope merged r=1.56%",
        "slope merged r=6.25%",
    ]


def test_command_writes_json_and_markdown_naming_the_machine(tmp_path, capsys):
    main(["layers", "--shapes", "32x64", "--tokens", "8", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "layers-cpu-reference.json").read_text())
    assert {"date", "command", "torch", "device"} <= set(result["info"])
    assert "| shape (out x in) |" in capsys.readouterr().out


def test_kernel_benchmark_refuses_to_time_interpreted_kernels_on_cpu(capsys):
    with pytest.raises(SystemExit):
        main(["kernels", "--shapes", "32x64"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_kernel_benchmark_reports_which_implementation_is_used(monkeypatch):
    from slope_lightning.bench import kernels
    from slope_lightning.sparse import KernelChoices

    def fake_measure(layout, dtype, device, tokens):
        times = {
            "lowrank_add": {"torch": 2.0, "triton": 1.0},
            "bias_add": {"torch": 1.0, "triton": 3.0},
        }
        return KernelChoices(lowrank_add="triton"), times

    monkeypatch.setattr(kernels, "kernels_unavailable", lambda device: None)
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure)
    rows = kernels.kernel_rows([(32, 64)], tokens=[8], device="cpu")
    assert [(r["step"], r["used"], r["torch/triton"]) for r in rows] == [
        ("lowrank_add", "triton", 2.0),
        ("bias_add", "torch", 1 / 3),
    ]


def gpu_check_commands() -> list[list[str]]:
    """The benchmark command lines of scripts/gpu_check.sh, continuation lines joined."""
    script = (Path(__file__).parents[1] / "scripts" / "gpu_check.sh").read_text()
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "$BENCH" in words:
            commands.append(words[words.index("$BENCH") + 1 :])
    return commands


def test_the_gpu_check_script_only_uses_options_and_names_that_exist():
    """The GPU machine is lent for minutes: a typo there would waste the whole run."""
    from slope_lightning.bench.__main__ import build_parser
    from slope_lightning.models import TransformerConfig

    commands = gpu_check_commands()
    assert {c[0] for c in commands} == {"kernels", "layers", "step", "inference", "memory"}
    for argv in commands:
        args = build_parser().parse_args([word.replace("$OUT", "out") for word in argv])
        assert isinstance(getattr(torch, args.dtype), torch.dtype)
        if args.models:
            layers.shapes_of(args.models.split(","))
        for preset in {args.preset, *args.presets.split(",")}:
            TransformerConfig.from_name(preset)
        for backend in args.backends.split(","):
            assert backend.removesuffix("+tiled") in ("reference", "cusparselt", "cutlass", "auto")
