"""GPU backend logic (padding, tiling, operand caching, dispatch, auto-tuning), proved on CPU
with emulated 2:4 kernels; the real kernels are checked in the `gpu` group."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from slope_lightning import add_adapters, merge_for_inference, sparsify
from slope_lightning.sparse import SparseLinear, backend_report, sparse_layers
from slope_lightning.sparse.backends import ReferenceBackend
from slope_lightning.sparse.gpu import (
    AutoBackend,
    CuSparseLtOps,
    CutlassOps,
    SemiStructuredBackend,
    ShapeLimits,
    make_gpu_backend,
    row_tiles,
)


class EmulatedOps:
    """Stands in for cuSPARSELt: dense math on CPU, with the kernels' shape rules asserted."""

    name = "emulated"
    limits: ClassVar[dict[torch.dtype, ShapeLimits]] = {
        torch.float64: ShapeLimits(16, 16, 8),
        torch.float32: ShapeLimits(16, 16, 8),
    }

    def __init__(self) -> None:
        self.compressed_shapes: list[tuple[int, int]] = []

    def compress(self, dense):
        rows, cols = dense.shape
        assert rows % 16 == 0 and cols % 16 == 0
        groups = (dense != 0).view(rows, cols // 4, 4).sum(-1)
        assert (groups <= 2).all(), "operand is not 2:4 along its columns"
        self.compressed_shapes.append((rows, cols))
        return dense.clone()

    def matmul(self, packed, x, rows):
        assert x.shape[0] % 8 == 0, "token dimension must be padded"
        assert packed.shape[0] == rows
        return x @ packed.t()


def emulated(**kwargs) -> SemiStructuredBackend:
    return SemiStructuredBackend(EmulatedOps(), require_cuda=False, **kwargs)


def twin_layers(d_in, d_out, backend, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out, dtype=torch.float64)
    return SparseLinear.from_linear(dense), SparseLinear.from_linear(dense, backend=backend)


@pytest.mark.parametrize("tokens", [13, 16, 1])
@pytest.mark.parametrize(
    ("d_in", "d_out", "tiles"),
    [(32, 32, {}), (16, 64, {"tile_forward": True}), (64, 16, {"tile_backward": True})],
)
def test_sparse_gemm_backend_matches_reference(tokens, d_in, d_out, tiles):
    reference, layer = twin_layers(d_in, d_out, emulated(**tiles))
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(tokens, d_out, dtype=torch.float64)
    layer(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.values.grad, reference.values.grad)
    torch.testing.assert_close(layer(x), reference(x_ref))


def test_tiles_are_square_row_blocks():
    assert row_tiles(64, 16, tile=True) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert row_tiles(40, 16, tile=True) == [(0, 16), (16, 32), (32, 40)]
    assert row_tiles(16, 64, tile=True) == [(0, 16)]
    assert row_tiles(64, 16, tile=False) == [(0, 64)]
    backend = emulated(tile_forward=True, tile_backward=True)
    _, layer = twin_layers(16, 64, backend)
    layer(torch.randn(8, 16, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert backend.ops.compressed_shapes == [(16, 16)] * 4 + [(16, 64)]  # W_R tiled, W_RCᵀ not


def test_compressed_operands_are_rebuilt_only_when_values_or_mask_change():
    backend = emulated()
    _, layer = twin_layers(32, 32, backend)
    layer.transpose_mask_interval = None
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
    assert layer._operands.builds == 2  # forward W_R and backward W_RCᵀ, once each
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    layer(x).sum().backward()
    assert layer._operands.builds == 4  # new values: both rebuilt
    layer.refresh_transpose_mask()
    layer(x).sum().backward()
    assert layer._operands.builds == 5  # new M_C: only W_RCᵀ rebuilt


def test_merged_inference_pads_adapter_rows_for_the_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48, dtype=torch.float64))
    sparsify(model, backend=emulated())
    add_adapters(model, rank=3)
    with torch.no_grad():
        model[0].adapter.up.normal_()
        x = torch.randn(5, 32, dtype=torch.float64)
        unmerged = model(x)
        merge_for_inference(model)
        torch.testing.assert_close(model(x), unmerged)
    fused_values, _, up = model[0]._fused
    assert fused_values.shape[0] % 32 == 0 and up.shape[0] == fused_values.shape[0] - 48


def test_tiled_merged_inference_keeps_the_adapter_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96, dtype=torch.float64))  # tall: 3 square row tiles
    ops = EmulatedOps()
    sparsify(model, backend=SemiStructuredBackend(ops, tile_forward=True, require_cuda=False))
    add_adapters(model, rank=5)
    with torch.no_grad():
        model[0].adapter.up.normal_()
        x = torch.randn(6, 32, dtype=torch.float64)
        unmerged = model(x)
        merge_for_inference(model)
        torch.testing.assert_close(model(x), unmerged)
    # [W_R; Lᵀ; zero padding] = 96 + 5 + 27 rows, compressed as four 32-row tiles
    assert ops.compressed_shapes[-4:] == [(32, 32)] * 4


@pytest.mark.parametrize(
    ("kwargs", "dtype", "match"),
    [
        ({"n": 1, "m": 4}, torch.float64, "runs 2:4 only, not 1:4"),
        ({}, torch.float16, "computes in float64, float32, not torch.float16"),
        ({"d_out": 40}, torch.float64, "multiple of 16"),
    ],
)
def test_an_explicit_backend_that_cannot_run_a_layer_names_it(kwargs, dtype, match):
    d_out = kwargs.pop("d_out", 32)
    layer = SparseLinear(
        32, d_out, backend=emulated(), name="blocks.0.mlp.up_proj", dtype=dtype, **kwargs
    )
    with pytest.raises(RuntimeError, match=f"blocks.0.mlp.up_proj.*{match}"):
        layer(torch.randn(4, 32, dtype=dtype))


def test_auto_keeps_the_fastest_candidate_and_remembers_it(tmp_path, monkeypatch):
    cache_file = tmp_path / "autotune.json"
    fast, slow = emulated(), emulated(tile_forward=True)
    auto = AutoBackend([fast, slow], autotune_file=cache_file, repeats=1)
    timings = {"emulated": 1.0, "emulated+tiled": 2.0, "reference": 3.0}
    monkeypatch.setattr(
        AutoBackend, "_time", lambda self, backend, args, layout: timings[backend.name]
    )
    _, layer = twin_layers(32, 64, auto)
    layer(torch.randn(8, 32, dtype=torch.float64))
    assert auto.choice.name == "emulated" and auto.choice.ops is fast.ops
    assert "measured" in auto.reason
    assert "emulated" in cache_file.read_text()

    def no_timing(*args):
        raise AssertionError("a cached choice must not be re-measured")

    monkeypatch.setattr(AutoBackend, "_time", no_timing)
    again = AutoBackend([emulated(), emulated(tile_forward=True)], autotune_file=cache_file)
    _, layer = twin_layers(32, 64, again)
    layer(torch.randn(8, 32, dtype=torch.float64))
    assert again.choice.name == "emulated" and "cached" in again.reason


def test_auto_decides_again_for_another_token_bucket_or_operand_shape(tmp_path, monkeypatch):
    measured = []

    def fake_time(self, backend, args, layout):
        measured.append((layout.rows, args[0].shape[0], backend.name))
        tokens = args[0].shape[0]  # sparse wins on big batches, dense when decoding
        return {"emulated": 1.0 if tokens > 8 else 3.0, "reference": 2.0}[backend.name]

    monkeypatch.setattr(AutoBackend, "_time", fake_time)
    auto = AutoBackend([emulated()], autotune_file=tmp_path / "a.json", repeats=1)
    reference, layer = twin_layers(32, 64, auto)
    for tokens in (64, 40, 1, 2):  # buckets 64, 64, 1, 2
        x = torch.randn(tokens, 32, dtype=torch.float64, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(layer(x), reference(x))
    picked = {key[-1]: backend.name for key, backend in auto.choices.items()}
    assert picked == {64: "emulated", 1: "reference", 2: "reference"}
    assert len(measured) == 6  # two candidates for each of three buckets
    with torch.no_grad():
        add_adapters(nn.Sequential(layer), rank=4)
        merge_for_inference(nn.Sequential(layer))
        layer(torch.randn(64, 32, dtype=torch.float64))
    assert (96, 32, torch.float64, 64) in auto.choices  # [W_R; Lᵀ; padding]: its own decision
    assert "T<=64" in (tmp_path / "a.json").read_text()
    assert "64x32 T<=1: reference" in backend_report(nn.Sequential(layer))
    layer.unmerge()
    layer(torch.randn(64, 32, dtype=torch.float64)).sum().backward()  # training again
    assert auto.choice is auto.choices[(64, 32, torch.float64, 64)]  # the running decision
    assert "auto -> emulated" in backend_report(nn.Sequential(layer))


def test_auto_falls_back_to_the_dense_gemm_with_the_reason(tmp_path):
    auto = AutoBackend([emulated()], autotune_file=tmp_path / "a.json")
    layer = SparseLinear(32, 32, n=1, m=4, backend=auto)  # 1:4: no 2:4 kernel applies
    layer(torch.randn(4, 32))
    assert isinstance(auto.choice, ReferenceBackend)
    assert "runs 2:4 only" in auto.reason


def test_auto_measures_for_real_on_cpu_and_reports_its_choice(tmp_path):
    auto = AutoBackend([emulated()], autotune_file=tmp_path / "a.json", repeats=2)
    reference, layer = twin_layers(32, 32, auto)
    model = nn.Sequential(layer)
    assert "auto -> ? (not chosen yet" in backend_report(model)
    x = torch.randn(8, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))
    assert auto.choice is not None and "ms" in auto.reason
    assert f"auto -> {auto.choice.name} (measured" in backend_report(model)


def test_each_kernel_library_names_the_gpus_it_cannot_run_on(monkeypatch):
    assert CutlassOps().unsupported_gpu((8, 0)) is None
    assert CutlassOps().unsupported_gpu((8, 9)) is None
    assert "sm80-sm89 only, this GPU is sm90" in CutlassOps().unsupported_gpu((9, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert CuSparseLtOps().unsupported_gpu((9, 0)) is None
    assert "sm80+" in CuSparseLtOps().unsupported_gpu((7, 5))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "no cuSPARSELt" in CuSparseLtOps().unsupported_gpu((9, 0))


def test_cusparselt_searches_an_algorithm_once_per_shape_for_all_layers(monkeypatch):
    calls = []

    def search(packed, dense, transpose_result):
        calls.append(tuple(dense.shape))
        assert transpose_result and not dense.is_contiguous()  # x.t(): column-major (k, T)
        return 3

    def sparse_mm(packed, dense, transpose_result, alg_id):
        assert alg_id == 3
        return (packed @ dense).t().contiguous()  # (T, rows), as cuSPARSELt returns it

    monkeypatch.setattr(CuSparseLtOps, "alg_ids", {})
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    weight, x = torch.randn(32, 16), torch.randn(8, 16)
    for _ in range(2):  # two layers of one shape: two instances, one search
        torch.testing.assert_close(CuSparseLtOps().matmul(weight, x, 32), x @ weight.t())
    assert calls == [(16, 8)]

    def failing_search(*args, **kwargs):
        raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", failing_search)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda p, d, transpose_result, alg_id: alg_id)
    assert CuSparseLtOps().matmul(weight, torch.randn(16, 16), 32) == 0  # default algorithm


def test_unknown_gpu_backend_name():
    expected = r"cusparselt, cutlass \(each optionally \+tiled\) or auto"
    with pytest.raises(ValueError, match=expected):
        make_gpu_backend("tensorrt")


def test_tiled_backends_can_be_asked_for_by_name():
    backend = make_gpu_backend("cusparselt+tiled")
    assert backend.name == "cusparselt+tiled" and backend.tile_forward and backend.tile_backward
    assert not make_gpu_backend("cutlass").tile_forward


def test_a_backend_subclass_that_skips_the_base_init_still_works():
    class Mine(ReferenceBackend):
        def __init__(self) -> None:  # no super().__init__()
            self.calls = 0

    layer = SparseLinear(32, 16, backend=Mine())
    layer(torch.randn(4, 32)).sum().backward()
    assert layer.values.grad is not None


def test_sparsify_shares_a_backend_instance():
    backend = emulated()
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    report = sparsify(model, backend=backend)
    assert report.backend == "emulated"
    assert all(layer.backend is backend for _, layer in sparse_layers(model))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["cusparselt", "cutlass", "auto"])
@pytest.mark.parametrize(
    ("d_in", "d_out", "tokens"), [(256, 256, 100), (256, 1024, 64), (1024, 256, 8)]
)
def test_gpu_backends_match_reference_in_bf16(name, d_in, d_out, tokens, tmp_path, monkeypatch):
    if name == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on sm8x only")
    monkeypatch.setenv("SLOPE_AUTOTUNE_FILE", str(tmp_path / "autotune.json"))
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out, device="cuda", dtype=torch.bfloat16)
    reference = SparseLinear.from_linear(dense)
    layer = SparseLinear.from_linear(dense, backend=name)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
    layer(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(layer(x), reference(x_ref), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=3e-2, rtol=3e-2)


def test_the_sparsify_report_of_auto_points_to_the_choices_made_later():
    from slope_lightning.sparse import SparsifyReport

    assert "backend_report(model)" in str(SparsifyReport(n=2, m=4, backend="auto"))
    assert "backend_report" not in str(SparsifyReport(n=2, m=4, backend="reference"))
