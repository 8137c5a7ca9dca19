"""The dynamic transposable 2:4 baseline: its mask, its layer, its model swap, its benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slope_lightning.baselines import (
    TransposableSparseLinear,
    transposable_mask,
    transposable_sparsify,
)
from slope_lightning.baselines.transposable import transposable_patterns
from slope_lightning.bench import step as bench_model
from slope_lightning.models import Transformer, TransformerConfig

SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1, "seq_len": 32, "vocab_size": 128}


def tiles_of(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) -> (rows/4, cols/4, 4, 4): every 4×4 tile."""
    rows, cols = mask.shape
    return mask.reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3)


def all_transposable_tiles() -> np.ndarray:
    """Every 0/1 4×4 matrix with row and column sums 2, as (count, 16) bool, found
    independently of the library: all 2^16 subsets of a tile, filtered."""
    bits = (np.arange(1 << 16)[:, None] >> np.arange(16)[None, :]) & 1  # (65536, 16)
    tiles = bits.reshape(-1, 4, 4)
    keep = (tiles.sum(1) == 2).all(1) & (tiles.sum(2) == 2).all(1)
    return bits[keep].astype(bool)


def brute_force_best(tiles: torch.Tensor) -> np.ndarray:
    """The largest kept |w| of each (…, 4, 4) tile over every transposable pattern."""
    magnitude = tiles.abs().double().reshape(-1, 16).numpy()  # (tiles, 16)
    return (magnitude @ all_transposable_tiles().T).max(axis=1)  # (tiles,)


# ---------------------------------------------------------------------------- the mask


def test_there_are_ninety_transposable_patterns_each_two_per_row_and_column():
    patterns = transposable_patterns().view(-1, 4, 4)
    assert patterns.shape[0] == 90
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == 90
    assert (patterns.sum(1) == 2).all() and (patterns.sum(2) == 2).all()


@pytest.mark.parametrize("shape", [(4, 4), (8, 12), (12, 20), (64, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_keeps_two_per_row_and_two_per_column_in_every_tile(shape, dtype, generator):
    weight = torch.randn(shape, generator=generator).to(dtype)
    mask = transposable_mask(weight)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    tiles = tiles_of(mask)
    assert (tiles.sum(-1) == 2).all(), "2 kept per row of each tile (2:4 along d_in)"
    assert (tiles.sum(-2) == 2).all(), "2 kept per column of each tile (2:4 along d_out)"


def test_mask_is_optimal_against_brute_force(generator):
    assert len(all_transposable_tiles()) == 90
    weight = torch.randn(32, 64, generator=generator)
    kept = tiles_of(weight.abs() * transposable_mask(weight)).sum((-1, -2)).flatten()
    np.testing.assert_allclose(kept.double().numpy(), brute_force_best(tiles_of(weight)), rtol=1e-6)


def test_mask_ties_go_to_the_first_pattern_deterministically():
    constant = torch.ones(4, 8)  # every pattern keeps the same magnitude in both tiles
    expected_tile = transposable_patterns()[0].view(4, 4)
    assert expected_tile.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]
    for _ in range(2):  # and again: the same answer
        mask = transposable_mask(constant)
        assert (tiles_of(mask) == expected_tile).all()
    # Signs do not matter, only magnitudes.
    assert torch.equal(transposable_mask(-constant), mask)


def test_mask_of_a_transposable_sparse_weight_keeps_exactly_its_nonzeros(generator):
    weight = torch.randn(16, 16, generator=generator)
    sparse = weight * transposable_mask(weight)
    assert torch.equal(transposable_mask(sparse), sparse != 0)


@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (8,), (2, 4, 4)])
def test_mask_rejects_shapes_without_whole_tiles(shape):
    with pytest.raises(ValueError, match="transposable_mask"):
        transposable_mask(torch.randn(shape))


# ---------------------------------------------------------------------------- the layer


def masked_dense_reference(weight, bias, x, grad_out):
    """Forward and gradients of the baseline by masked dense algebra: W_s = W ⊙ M serves the
    forward and the input gradient; the weight gradient is the dense dYᵀX (straight through)."""
    mask = transposable_mask(weight)
    w_s = weight.detach() * mask
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    y = x.detach() @ w_s.t() + bias.detach()
    dx = (g2 @ w_s).reshape(x.shape)
    return y, dx, g2.t() @ x2, g2.sum(0), mask


def test_forward_and_backward_match_a_masked_dense_reference(generator):
    linear = nn.Linear(24, 16, dtype=torch.float64)
    layer = TransposableSparseLinear.from_linear(linear, backend="reference")
    x = torch.randn(2, 3, 24, dtype=torch.float64, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 3, 16, dtype=torch.float64, generator=generator)
    y_ref, dx_ref, dw_ref, db_ref, mask = masked_dense_reference(
        linear.weight, linear.bias, x, grad_out
    )

    y = layer(x)
    y.backward(grad_out)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, dx_ref)  # dY · W_s: the same sparse weight
    torch.testing.assert_close(layer.weight.grad, dw_ref)  # dense dYᵀX
    torch.testing.assert_close(layer.bias.grad, db_ref)
    assert (layer.weight.grad[~mask] != 0).all(), "pruned entries get a gradient (STE)"


def test_from_linear_shares_the_dense_parameters_and_reports_itself():
    linear = nn.Linear(8, 4, bias=False)
    layer = TransposableSparseLinear.from_linear(linear, backend="reference", name="blocks.0.fc")
    assert layer.weight is linear.weight and layer.bias is None
    assert repr(layer) == (
        "TransposableSparseLinear(in_features=8, out_features=4, bias=False, backend='reference')"
    )


def test_layer_rejects_bad_sizes_and_backends():
    with pytest.raises(ValueError, match=r"in_features \(d_in\)=30 is not divisible by 4"):
        TransposableSparseLinear(30, 8)
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        TransposableSparseLinear(8, 8, backend="triton")
    layer = TransposableSparseLinear(8, 8, backend="reference")
    with pytest.raises(ValueError, match="input has 6 features, expected 8"):
        layer(torch.randn(2, 6))


def test_explicit_gpu_backend_that_cannot_run_names_the_layer_and_the_fix():
    layer = TransposableSparseLinear(64, 128, backend="cutlass", name="blocks.0.mlp.up_proj")
    with pytest.raises(RuntimeError, match=r"'blocks.0.mlp.up_proj' \(128x64.*backend='auto'"):
        layer(torch.randn(2, 64))


def test_auto_backend_falls_back_to_the_reference_on_cpu():
    layer = TransposableSparseLinear(64, 64, backend="auto")
    layer(torch.randn(2, 64))
    assert layer.chosen_backends == ("reference",)


def test_evaluation_reuses_the_mask_until_the_weight_changes(generator):
    layer = TransposableSparseLinear(16, 16, backend="reference")
    x = torch.randn(4, 16, generator=generator)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert layer.mask_builds == 1
    layer(x).square().sum().backward()  # a training forward prunes anew, keeps nothing
    assert layer.mask_builds == 2 and layer.cached_tensors() == []


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=10.0),
        lambda p: torch.optim.AdamW(p, lr=1.0, fused=True),
        lambda p: torch.optim.AdamW(p, lr=1.0, foreach=True),
    ],
    ids=["sgd", "adamw-fused", "adamw-foreach"],
)
def test_after_any_optimizer_step_the_layer_uses_the_new_mask(generator, make_optimizer):
    layer = TransposableSparseLinear(16, 16, backend="reference")
    optimizer = make_optimizer(layer.parameters())
    x = torch.randn(4, 16, generator=generator)
    with torch.no_grad():
        layer(x)  # an evaluation before the step caches the mask
    before = layer.sparse_weight()
    layer(x).square().sum().backward()
    optimizer.step()  # a large step: the magnitudes, and so the mask, change
    expected = layer.weight.detach() * transposable_mask(layer.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.t() + layer.bias)
    after = layer.sparse_weight()
    assert torch.equal(after, expected)
    assert not torch.equal(after != 0, before != 0)


def test_bf16_autocast_on_cpu_computes_in_bf16_and_keeps_fp32_gradients(generator):
    linear = nn.Linear(32, 16)
    layer = TransposableSparseLinear.from_linear(linear, backend="reference")
    x = torch.randn(4, 32, generator=generator, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    w_s = linear.weight.detach() * transposable_mask(linear.weight.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the mask is scored in float32 anyway
        assert torch.equal(transposable_mask(linear.weight) != 0, w_s != 0)
    torch.testing.assert_close(y.float(), x.detach() @ w_s.t() + linear.bias, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad, torch.ones(4, 16) @ w_s, atol=5e-2, rtol=2e-2)
    assert torch.isfinite(layer.weight.grad).all()


# ---------------------------------------------------------------------------- the model


def test_transposable_sparsify_converts_the_block_linears_of_the_tiny_transformer():
    model = Transformer(TransformerConfig.from_name("tiny"))
    block_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.")
    }
    converted = transposable_sparsify(model, backend="reference")
    assert set(converted) == block_linears and len(converted) == 4 * 7
    assert isinstance(model.lm_head, nn.Linear), "the (tied) LM head stays dense"
    assert all(
        isinstance(model.get_submodule(name), TransposableSparseLinear) for name in converted
    )
    idx = torch.randint(0, 8192, (1, 8))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(model.get_submodule(name).weight.grad is not None for name in converted)


def test_transposable_sparsify_skips_what_it_cannot_convert_unless_included():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 8))
    assert transposable_sparsify(model, backend="reference") == ["2"]
    with pytest.raises(ValueError, match="layer '1' matches include pattern '1'"):
        transposable_sparsify(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8)), include=["1"])


# ---------------------------------------------------------------------------- the benchmark


def test_step_benchmark_measures_dense_slope_and_transposable_side_by_side():
    rows = bench_model.step_rows("tiny", batch=1, repeats=1, **SMALL)
    assert [row["method"] for row in rows] == [
        "dense",
        "slope (reference)",
        "transposable (reference)",
    ]
    assert rows[0]["speedup_vs_dense"] == 1.0
    assert all(row["step_ms"] > 0 and row["speedup_vs_dense_same_compile"] > 0 for row in rows)
    assert all(row["note"] == "" and row["compiled"] is False for row in rows)


def test_step_benchmark_records_a_failed_compile_instead_of_crashing(monkeypatch):
    def broken_compile(model, **options):
        def forward(*args):
            raise RuntimeError("backend exploded\nlong traceback")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = bench_model.step_rows("tiny", batch=1, repeats=1, compile_modes=(False, True), **SMALL)
    assert [row["compiled"] for row in rows] == [False] * 3 + [True] * 3
    eager, compiled = rows[:3], rows[3:]
    assert all(row["step_ms"] > 0 for row in eager)
    assert all(row["step_ms"] is None for row in compiled)
    assert all(row["note"] == "RuntimeError: backend exploded" for row in compiled)
    assert all(row["speedup_vs_dense"] is None for row in compiled)


# ---------------------------------------------------------------------------- GPU kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
@pytest.mark.parametrize(("d_in", "d_out", "tokens"), [(256, 256, 100), (256, 512, 64)])
def test_gpu_kernels_match_the_dense_product_of_their_own_sparse_weight(
    backend, d_in, d_out, tokens
):
    from slope_lightning.baselines.transposable import _backend_problem

    why = _backend_problem(backend, d_out, d_in, torch.bfloat16, torch.device("cuda"))
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, device="cuda", dtype=torch.bfloat16)
    layer = TransposableSparseLinear.from_linear(linear, backend=backend)
    x = torch.randn(2, tokens // 2, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, tokens // 2, d_out, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    y.backward(grad)
    assert layer.chosen_backends == (backend,)

    w_s = layer.sparse_weight(torch.bfloat16).float()  # the backend's own (greedy) W_s
    tiles = tiles_of(w_s != 0)
    assert (tiles.sum(-1) <= 2).all() and (tiles.sum(-2) <= 2).all()
    exact = linear.weight.detach().float().abs() * transposable_mask(linear.weight.detach())
    assert w_s.abs().sum() >= 0.9 * exact.sum(), "greedy keeps nearly the optimal magnitude"

    x2, g2 = x.detach().float().reshape(-1, d_in), grad.float().reshape(-1, d_out)
    torch.testing.assert_close(
        y.float().reshape(-1, d_out), x2 @ w_s.t() + linear.bias.float(), atol=5e-2, rtol=5e-2
    )
    torch.testing.assert_close(x.grad.float().reshape(-1, d_in), g2 @ w_s, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(layer.weight.grad.float(), g2.t() @ x2, atol=2e-1, rtol=5e-2)


@pytest.mark.gpu
@cuda
def test_gpu_auto_backend_trains_the_tiny_transformer_under_bf16_autocast():
    model = Transformer(TransformerConfig.from_name("tiny")).cuda()
    transposable_sparsify(model, backend="auto")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 8192, (2, 64), device="cuda")
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------- cuSPARSELt operands
# The GPU run of this path is in test_gpu_kernels_match_the_dense_product_of_their_own_sparse_weight
# and test_gpu_the_tile_pruners_cusparselt_packing_matches_this_cusparselt.


def fake_tile_op(calls: list[dict[str, object]]):
    """torch._sparse_semi_structured_tile on CPU: binds its call to this torch's schema of the
    op (names and types), records it, and returns outputs of the real op's shapes."""
    schema = torch.ops.aten._sparse_semi_structured_tile.default._schema
    kinds = {"TensorType": torch.Tensor, "StringType": str, "BoolType": bool}

    def tile(*args, **kwargs):
        bound = dict(zip([a.name for a in schema.arguments], args, strict=False))
        assert not set(bound) & set(kwargs), "an argument given twice"
        bound.update(kwargs)
        for argument in schema.arguments:
            assert argument.name in bound or argument.default_value is not None, argument.name
        for name, value in bound.items():
            argument = next((a for a in schema.arguments if a.name == name), None)
            assert argument is not None, f"{name!r} is not an argument of {schema}"
            assert isinstance(value, kinds[argument.type.kind()]), (name, value)
        calls.append(bound)
        rows, cols = bound["input"].shape
        size = rows * cols // 2 + rows * cols // 16  # kept values, then 1 bit per entry
        like = bound["input"]
        outputs = (like.new_empty(size), like.new_empty(0), like.new_empty(size), like.new_empty(0))
        bitmask = torch.empty(rows // 4, cols // 4, 8, dtype=torch.uint8)
        assert len(outputs) + 1 == len(schema.returns)
        return (*outputs, bitmask)

    return tile


def test_cusparselt_operands_come_from_one_tile_call_that_fits_the_ops_schema(monkeypatch):
    from slope_lightning.baselines import transposable
    from slope_lightning.sparse.backends.ops import TILE_ALGORITHM, CuSparseLtOps

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(torch, "_sparse_semi_structured_tile", fake_tile_op(calls))
    monkeypatch.setattr(transposable, "_tile_packing_checked", lambda device, dtype: True)

    def no_compress(self, dense):
        raise AssertionError("W_s is packed by the tile call, not compressed again")

    monkeypatch.setattr(CuSparseLtOps, "compress", no_compress)
    weight = torch.randn(256, 128)
    packed, packed_t, bitmask = transposable._build_operands("cusparselt", weight, torch.float16)
    assert len(calls) == 1
    assert calls[0]["use_cutlass"] is False and calls[0]["algorithm"] == TILE_ALGORITHM
    assert calls[0]["input"].dtype == torch.float16 and calls[0]["input"].is_contiguous()
    assert packed.numel() == packed_t.numel() == 256 * 128 * 9 // 16
    assert bitmask.dtype == torch.uint8


def test_sizes_that_are_not_multiples_of_128_keep_the_separate_compressions(monkeypatch):
    from slope_lightning.baselines import transposable

    def unchecked(device, dtype):
        raise AssertionError("no packing check for a size the tile packing cannot take")

    monkeypatch.setattr(transposable, "_tile_packing_checked", unchecked)
    assert not transposable._tile_packs_for_cusparselt(torch.empty(192, 64))
    assert not transposable._tile_packs_for_cusparselt(torch.empty(128, 192))


def emulated_tile_kernel(monkeypatch, ops, pack):
    """The tile pruner and its dense apply on CPU: the exact transposable mask as the
    bitmask, and ``pack(pruned)`` -> (packed, packed_t) as the packing."""
    from slope_lightning.baselines import transposable

    def tile_prune(weight, use_cutlass):
        assert use_cutlass is False
        mask = transposable_mask(weight)
        packed, packed_t = pack(weight * mask)
        return packed, None, packed_t, None, mask

    monkeypatch.setattr(transposable, "tile_prune", tile_prune)
    monkeypatch.setattr(transposable, "apply_tile_mask", lambda weight, mask: weight * mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tile_packing_check_accepts_exactly_the_packing_the_library_reads(monkeypatch, dtype):
    from slope_lightning.baselines.transposable import tile_packing_matches
    from slope_lightning.sparse.backends.ops import EmulatedOps

    ops, cpu = EmulatedOps(), torch.device("cpu")

    def right(w):
        return ops.compress(w), ops.compress(w.t().contiguous())

    def swapped(w):
        return ops.compress(w.t().contiguous()), ops.compress(w)

    def other_values(w):  # the right positions, the values of another layout
        return ops.compress(w.flip(0)), ops.compress(w.t().contiguous())

    def failing(w):
        raise RuntimeError("CUDA error: misaligned address")

    emulated_tile_kernel(monkeypatch, ops, right)
    assert tile_packing_matches(ops, cpu, dtype)
    for wrong in (swapped, other_values, failing):
        emulated_tile_kernel(monkeypatch, ops, wrong)
        assert not tile_packing_matches(ops, cpu, dtype), wrong.__name__


@pytest.mark.gpu
@cuda
def test_gpu_the_tile_pruners_cusparselt_packing_matches_this_cusparselt():
    # False means the baseline runs on the slower path (compress W_s and W_sᵀ separately).
    from slope_lightning.baselines.transposable import _backend_problem, tile_packing_matches
    from slope_lightning.sparse.backends.ops import make_ops

    device = torch.device("cuda")
    why = _backend_problem("cusparselt", 256, 256, torch.bfloat16, device)
    if why is not None:
        pytest.skip(why)
    for dtype in (torch.bfloat16, torch.float16):
        assert tile_packing_matches(make_ops("cusparselt"), device, dtype), dtype
