"""Peak training/inference memory of dense, SLoPe and the transposable baseline, and the PNG
plots next to every benchmark table (tiny shapes; on CPU the counts are exact)."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch
from torch import nn

from slope_lightning.bench import common, counting, peak, plot
from slope_lightning.bench.__main__ import main
from slope_lightning.bench.methods import METHODS
from slope_lightning.sparse import sparse_layers, sparsify

SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1, "seq_len": 32, "vocab_size": 128}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def peaks() -> list[dict]:
    return peak.peak_rows(("tiny",), batch=2, device="cpu", **SMALL)  # seq_len 32


def _row(rows: list[dict], phase: str, method: str) -> dict:
    return next(r for r in rows if r["phase"] == phase and r["method"] == method)


def test_peak_rows_cover_training_and_inference_of_all_three_methods(peaks):
    assert [(r["phase"], r["method"]) for r in peaks] == [
        (phase, method) for phase in ("training", "inference") for method in METHODS
    ]
    assert set(METHODS) == {"dense", "slope", "transposable"}
    assert all(r["tokens"] == 2 * 32 and r["device"] == "cpu" for r in peaks)
    assert {r["method"]: r["kernels"] for r in peaks} == {
        "dense": "dense",
        "slope": "reference",
        "transposable": "reference",
    }
    assert all(
        _row(peaks, phase, "dense")["vs_dense"] == 1.0 for phase in ("training", "inference")
    )


def test_a_cpu_peak_row_says_it_is_an_exact_count_not_an_allocator_peak(peaks):
    for row in peaks:
        expected = peak.MEASURE_CPU_TRAIN if row["phase"] == "training" else peak.MEASURE_CPU_INFER
        assert row["measure"] == expected
        assert "exact count, CPU" in row["measure"] and "CUDA" not in row["measure"]


def test_cpu_training_count_is_model_state_plus_saved_activations(peaks):
    for row in (r for r in peaks if r["phase"] == "training"):
        assert row["saved_activations_MiB"] > 0
        assert row["memory_MiB"] == pytest.approx(row["state_MiB"] + row["saved_activations_MiB"])


def test_slope_needs_less_training_and_inference_memory_than_dense(peaks):
    for phase in ("training", "inference"):
        slope, dense = _row(peaks, phase, "slope"), _row(peaks, phase, "dense")
        assert slope["memory_MiB"] < dense["memory_MiB"]
        assert slope["vs_dense"] == pytest.approx(slope["memory_MiB"] / dense["memory_MiB"])


def test_the_transposable_baseline_counts_its_mask_on_top_of_the_dense_master_weight(peaks):
    for phase in ("training", "inference"):
        transposable, dense = _row(peaks, phase, "transposable"), _row(peaks, phase, "dense")
        assert transposable["memory_MiB"] > dense["memory_MiB"]


def test_peak_rows_reject_unknown_methods():
    with pytest.raises(ValueError, match="unknown methods"):
        peak.peak_rows(("tiny",), methods=("dense", "sr-ste"), device="cpu", **SMALL)


def test_saved_activation_counter_counts_a_tensor_saved_twice_once():
    x = torch.randn(4, 8, requires_grad=True)
    with counting.StorageCounter() as saved:
        (x * x).sum()  # mul saves x as both operands
    assert saved.bytes_excluding([]) == x.numel() * x.element_size()


def test_saved_activation_counter_counts_views_as_their_one_storage():
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2  # (4, 8), saved by nothing yet
    with counting.StorageCounter() as saved:
        (h.view(8, 4).sin() + h.t().cos()[:, :1].sum()).sum()  # sin and cos save views of h
    assert saved.bytes_excluding([]) == h.numel() * h.element_size()


def test_saved_activation_counter_leaves_out_model_state():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    with counting.StorageCounter() as saved:
        layer(x).sum().backward()  # linear saves its input and its weight
    assert saved.bytes_excluding(counting.state_tensors(layer)) == x.numel() * x.element_size()


def test_saved_activation_counter_counts_meta_tensors_by_their_size():
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    with counting.StorageCounter() as saved:
        (x * x).sum()
    assert saved.bytes_excluding([]) == 4 * 8 * 4


def test_a_transpose_mask_derived_in_the_forward_counts_as_model_state_not_activation():
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    sparsify(model)
    model.train()
    ((_, layer),) = sparse_layers(model)
    before = layer.col_index
    x = torch.randn(3, 16)
    with counting.StorageCounter() as saved:
        model(x)  # re-derives M_C (transpose_mask_interval=1) and saves the new one
    assert layer.col_index.untyped_storage() is not before.untyped_storage()
    mask_bytes = layer.col_index.untyped_storage().nbytes()
    assert saved.bytes_excluding([x]) > mask_bytes  # the fresh M_C was saved
    assert saved.bytes_excluding(counting.state_tensors(model)) == x.numel() * x.element_size()


def test_write_results_draws_a_png_next_to_json_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"method": "dense", "ratio": 1.0}, {"method": "slope", "ratio": 0.7}]
    common.write_results("demo", tmp_path, {"device": "cpu"}, rows, ["method", "ratio"], "ratio")
    assert (tmp_path / "demo.png").read_bytes().startswith(PNG_MAGIC)
    assert {p.name for p in tmp_path.iterdir()} == {"demo.json", "demo.md", "demo.png"}


def test_write_results_without_matplotlib_skips_the_png_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rows = [{"method": "slope", "ratio": 0.7}]
    with caplog.at_level(logging.WARNING, logger="slope_lightning.bench.common"):
        common.write_results(
            "demo", tmp_path, {"device": "cpu"}, rows, ["method", "ratio"], "ratio"
        )
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == rows
    assert (tmp_path / "demo.md").is_file()
    assert 'pip install -e ".[bench]"' in caplog.text


def test_plot_skips_rows_without_a_numeric_value(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"method": "dense", "ratio": 1.0},
        {"method": "missing"},
        {"method": "text", "ratio": "n/a"},
        {"method": "nan", "ratio": math.nan},
        {"method": "bool", "ratio": True},
        {"method": "slope", "ratio": 0.7},
    ]
    assert [r["method"] for r in plot.drawable_rows(rows, "ratio")] == ["dense", "slope"]
    path = plot.bar_chart(tmp_path / "mixed.png", rows, ["method", "ratio"], "ratio", "t", {})
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)
    nothing = plot.bar_chart(
        tmp_path / "none.png", rows[1:5], ["method", "ratio"], "ratio", "t", {}
    )
    assert nothing is None and not (tmp_path / "none.png").exists()


def test_bars_are_labelled_by_the_columns_that_tell_rows_apart():
    rows = [
        {"preset": "tiny", "phase": "training", "method": "dense", "MiB": 2.0, "vs_dense": 1.0},
        {"preset": "tiny", "phase": "training", "method": "slope", "MiB": 1.5, "vs_dense": 0.75},
    ]
    columns = ["preset", "phase", "method", "MiB", "vs_dense"]
    assert plot.label_columns(rows, columns, "vs_dense") == ["method"]


def test_benchmark_command_writes_a_png_for_its_table(tmp_path):
    pytest.importorskip("matplotlib")
    main(["layers", "--shapes", "32x64", "--tokens", "8", "--repeats", "1", "--out", str(tmp_path)])
    assert (tmp_path / "layers-cpu-reference.png").read_bytes().startswith(PNG_MAGIC)
