"""The benchmark commands run and report what they claim (tiny shapes; numbers not asserted,
except exact memory counts)."""

from __future__ import annotations

import json

import pytest
import torch

from slope_lightning.bench import common, inference, layers, memory, methods, step
from slope_lightning.bench.__main__ import main
from slope_lightning.utils import machine_info

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
        (16, "fwd+bwd+update"),
        (8, "forward"),
        (8, "input-grad"),
        (8, "fwd+bwd"),
        (8, "fwd+bwd+update"),
    ]
    assert all(row["backend"] == "reference (CPU)" and row["slope/dense"] > 0 for row in rows)


def test_layer_benchmark_knows_the_projection_shapes_of_the_papers_models():
    assert layers.shapes_of(["gpt2-small"]) == [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    assert (14336, 4096) in layers.shapes_of(["llama-3-8b", "mistral-7b"])
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        layers.shapes_of(["gpt5"])


def test_a_backend_that_cannot_run_gets_a_row_saying_why():
    rows = layers.layer_rows(shapes=((32, 64),), tokens=8, repeats=1, backends=("cutlass_tiled",))
    assert rows[-1]["phase"] == "all" and "CUDA" in rows[-1]["note"]


def test_step_and_inference_benchmarks_cover_dense_and_slope():
    steps = step.step_rows("tiny", batch=2, repeats=1, **SMALL)
    assert [row["method"] for row in steps] == [
        "dense",
        "slope (reference)",
        "transposable (reference)",
    ]
    assert steps[0]["speedup_vs_dense"] == 1.0
    rows = inference.inference_rows("tiny", prompt=8, new_tokens=2, repeats=1, **SMALL)
    assert [row["method"] for row in rows] == [
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


def test_a_results_table_is_on_disk_after_every_row(tmp_path):
    """A suite killed by a timeout keeps every row it finished, marked incomplete."""
    table = common.ResultsTable("demo", tmp_path, {"device": "cpu"}, ["method", "ms"], "ms")
    for count, row in enumerate([{"method": "dense", "ms": 2.0}, {"method": "slope", "ms": 1.0}]):
        table.add(row)
        on_disk = json.loads((tmp_path / "demo.json").read_text())
        assert on_disk["rows"] == table.rows and len(on_disk["rows"]) == count + 1
        assert on_disk["complete"] is False and on_disk["columns"] == ["method", "ms"]
        assert "**Incomplete:**" in (tmp_path / "demo.md").read_text()
    text = table.close(plot=False)
    assert json.loads((tmp_path / "demo.json").read_text())["complete"] is True
    assert "Incomplete" not in text and "| slope | 1.000 |" in text
    assert {p.name for p in tmp_path.iterdir()} == {"demo.json", "demo.md"}  # no temp files


def test_a_suite_that_stops_midway_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    measured = layers._time_phase

    def dies_on_the_second_shape(phase, layer, x, repeats):
        if x.shape[1] == 32:  # the second shape's input: stands in for a timeout
            raise KeyboardInterrupt
        return measured(phase, layer, x, repeats)

    monkeypatch.setattr(layers, "_time_phase", dies_on_the_second_shape)
    argv = ["layers", "--shapes", "32x64,64x32", "--tokens", "8", "--repeats", "1"]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path), "--no-plot"])
    result = json.loads((tmp_path / "layers-cpu-reference.json").read_text())
    assert result["complete"] is False
    assert [(r["shape (out x in)"], r["phase"]) for r in result["rows"]] == [
        ("32x64", phase) for phase in layers.PHASES
    ]
    assert (
        f"stopped after {len(layers.PHASES)} rows"
        in (tmp_path / "layers-cpu-reference.md").read_text()
    )


def test_every_suite_hands_over_each_row_as_it_is_measured():
    seen: list[dict] = []
    rows = step.step_rows("tiny", batch=1, repeats=1, on_row=seen.append, **SMALL)
    assert seen == rows and len(rows) == 3
    assert all(row["speedup_vs_dense"] is not None for row in seen)  # known when emitted
    seen.clear()
    rows = inference.inference_rows("tiny", prompt=4, new_tokens=1, repeats=1, ranks=(0.0,),
                                    on_row=seen.append, **SMALL)  # fmt: skip
    assert seen == rows and len(rows) == 2
    seen.clear()
    rows = memory.layer_rows(shapes=((8, 16),), tokens=2, on_row=seen.append)
    assert seen == rows and len(rows) == 1


def test_no_plot_writes_json_and_markdown_only(tmp_path):
    argv = ["layers", "--shapes", "32x64", "--tokens", "8", "--repeats", "1", "--no-plot"]
    main([*argv, "--out", str(tmp_path)])
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md"}


def test_tables_name_the_versions_that_decide_sparse_speed():
    info = machine_info("python -m slope_lightning.bench layers")
    assert {"torch", "cuda", "triton", "device", "code", "command"} <= set(info)


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


def test_bf16_mixed_trains_fp32_master_values_under_bf16_autocast():
    """The step and memory benchmarks train as the configs do (precision: bf16-mixed)."""
    model, config = methods.method_model("micro", "slope", "emulated", precision="bf16-mixed")
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    idx = torch.randint(0, config.vocab_size, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16  # the forward ran under bf16 autocast
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    rows = step.step_rows("micro", batch=1, repeats=1, precision="bf16-mixed")
    assert {row["precision"] for row in rows} == {"bf16-mixed"}


def test_the_benchmarks_have_a_model_at_the_widths_where_2_4_gemms_pay():
    config = methods.bench_config("llama-8b-4l")
    assert (config.d_model, config.mlp_hidden, config.n_kv_head) == (4096, 14336, 8)
    assert max(shape[1] for shape in layers.shapes_of(["llama-3-8b"])) == 14336
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        methods.precision_dtypes("fp8")


def test_the_inference_benchmark_refuses_a_prompt_that_leaves_no_room_to_decode():
    with pytest.raises(ValueError, match="prompt 30 \\+ new_tokens 4 exceeds .* seq_len 32"):
        inference.inference_rows("tiny", prompt=30, new_tokens=4, repeats=1, **SMALL)
