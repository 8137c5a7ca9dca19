"""SparseLinear computes exactly SLoPe's forward and double-pruned backward, and plays well
with the rest of PyTorch (optimizers, clipping, state dicts, dtypes, autocast)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from conftest import reference_slope_linear
from slope_lightning.sparse import SparseLinear

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]


def make_layer(d_in, d_out, n=2, m=4, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    if bias:
        nn.init.normal_(dense.bias)
    return dense, SparseLinear.from_linear(dense, n, m)


@pytest.mark.parametrize(("n", "m"), PATTERNS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(13, 32), (2, 7, 32)])
def test_forward_and_gradients_match_the_masked_dense_reference(n, m, bias, x_shape):
    dense, layer = make_layer(32, 24, n, m, bias)
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*x_shape[:-1], 24, dtype=torch.float64)
    y = layer(x)
    y.backward(grad_out)
    ref_y, ref_dx, ref_dw, ref_db, mask_r = reference_slope_linear(
        dense.weight.detach(), None if not bias else dense.bias.detach(), x.detach(), grad_out, n, m
    )
    torch.testing.assert_close(y, ref_y, atol=1e-10, rtol=0)
    torch.testing.assert_close(x.grad, ref_dx, atol=1e-10, rtol=0)
    # The values' gradient is the dense gradient at M_R, in packed order.
    torch.testing.assert_close(layer.values.grad, ref_dw[mask_r].view(24, -1), atol=1e-10, rtol=0)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref_db, atol=1e-10, rtol=0)
    assert layer.bias is None if not bias else layer.bias.grad is not None


def test_input_gradient_really_uses_the_double_pruned_weight():
    """With random weights double pruning drops ~19% of W_R: dX differs from the true gradient."""
    _, layer = make_layer(64, 64)
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    true_dx = torch.ones(16, 64, dtype=torch.float64) @ layer.to_dense()
    assert not torch.allclose(x.grad, true_dx)
    refresh = layer.refresh_transpose_mask()
    assert 0.70 < refresh.kept / refresh.total < 0.90  # ≈ 1.625 / 2 for independent masks


def test_gradcheck_of_values_and_bias():
    _, layer = make_layer(16, 8)
    x = torch.randn(5, 16, dtype=torch.float64)
    fn = lambda values, bias: torch.func.functional_call(  # noqa: E731
        layer, {"values": values, "bias": bias}, (x,)
    )
    assert torch.autograd.gradcheck(
        fn, (layer.values.detach().requires_grad_(), layer.bias.detach().requires_grad_())
    )


def test_gradcheck_of_input_when_double_pruning_drops_nothing():
    """If every column group of W_R already has at most N nonzeros, dY W_RC is the exact dX."""
    big = torch.zeros(8, 8, dtype=torch.bool)
    big[0:2, [0, 1, 4, 5]] = big[2:4, [2, 3, 6, 7]] = True
    big[4:6, [0, 1, 4, 5]] = big[6:8, [2, 3, 6, 7]] = True
    noise = torch.rand(8, 8, dtype=torch.float64)
    weight = torch.where(big, 1.0 + noise, 1e-3 * noise)
    layer = SparseLinear(8, 8, bias=False, weight=weight)
    mask = layer.layout.mask(layer.row_index).double()
    assert (mask.view(2, 4, 8).sum(1) <= 2).all()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_no_dense_tensor_persists_and_metadata_is_two_bits_per_value():
    _, layer = make_layer(256, 128, dtype=torch.float32)
    layer(torch.randn(4, 256)).sum().backward()
    state = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    grads = [p.grad for p in layer.parameters()]
    for tensor in [*state.values(), *grads]:
        assert tensor.numel() < 128 * 256 // 2 + 1
    assert layer.values.shape == (128, 128)
    assert layer.row_index.numel() == 128 * 128 // 4  # bytes: 4 offsets per byte
    assert layer.col_index.numel() == 256 * 64 // 4


def test_backward_saves_no_dense_weight():
    _, layer = make_layer(64, 32, dtype=torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert (32, 64) not in saved_shapes


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=False),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True),
    ],
    ids=["adamw", "adamw-foreach", "adamw-fused", "sgd", "sgd-foreach"],
)
def test_any_torch_optimizer_trains_it_and_keeps_the_mask(make_optimizer):
    _, layer = make_layer(32, 16, dtype=torch.float32)
    mask_before = layer.layout.mask(layer.row_index).clone()
    optimizer = make_optimizer(layer.parameters())
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.layout.mask(layer.row_index), mask_before)  # M_R is static
    for state in optimizer.state.values():  # optimizer state is half size by construction
        for value in state.values():
            assert value.numel() <= 16 * 16


def test_transpose_mask_is_rederived_after_each_update_by_default():
    _, layer = make_layer(32, 32, dtype=torch.float32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = torch.randn(8, 32)
    for _ in range(3):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer(x)  # first forward after an update re-derives M_C from the current W_R
    expected = SparseLinear(32, 32, weight=layer.to_dense()).col_index
    assert torch.equal(layer.col_index, expected)


def test_manual_mode_never_refreshes_on_its_own():
    _, layer = make_layer(32, 32, dtype=torch.float32)
    layer.transpose_mask_interval = None
    optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
    x = torch.randn(8, 32)
    col_index = layer.col_index
    for _ in range(3):
        layer(x).square().sum().backward()
        optimizer.step()
    layer(x)
    assert layer.col_index is col_index
    assert layer.refresh_transpose_mask().flipped > 0


def test_state_dict_round_trip_into_a_fresh_layer_is_exact():
    _, layer = make_layer(32, 16, dtype=torch.float32)
    with torch.no_grad():
        layer.values.mul_(3)
    layer.refresh_transpose_mask()
    fresh = SparseLinear(32, 16)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 32, requires_grad=True)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.col_index, layer.col_index)
    assert set(layer.state_dict()) == {"values", "bias", "row_index", "col_index", "_extra_state"}


def test_torch_save_and_weights_only_load():
    _, layer = make_layer(32, 16, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = SparseLinear(32, 16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.to_dense(), layer.to_dense())


def test_resume_keeps_the_pending_transpose_mask_refresh():
    """A checkpoint taken between an update and the next forward must still refresh M_C."""
    _, layer = make_layer(32, 32, dtype=torch.float32)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = torch.randn(8, 32)
    layer(x).square().sum().backward()
    optimizer.step()
    state = layer.state_dict()
    fresh = SparseLinear(32, 32)
    fresh.load_state_dict(state)
    fresh(x.requires_grad_())
    layer(x)
    assert torch.equal(fresh.col_index, layer.col_index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_dtype_converts_values_but_keeps_metadata(dtype):
    _, layer = make_layer(32, 16, dtype=torch.float32)
    layer = layer.to(dtype)
    assert layer.values.dtype == dtype and layer.row_index.dtype == torch.uint8
    y = layer(torch.randn(4, 32, dtype=dtype))
    assert y.dtype == dtype


def test_bf16_autocast_computes_in_bf16_and_returns_fp32_gradients():
    _, layer = make_layer(32, 16, dtype=torch.float32)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.isfinite(layer.values.grad).all()


def test_to_dense_and_to_linear_give_the_same_function():
    _, layer = make_layer(32, 16)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))
    assert layer.to_dense().shape == (16, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 30, "out_features": 16}, "in_features.*=30 is not divisible by m=4"),
        ({"in_features": 32, "out_features": 18}, "out_features.*=18 is not divisible by m=4"),
        ({"in_features": 32, "out_features": 16, "n": 4}, "n < m"),
        ({"in_features": 32, "out_features": 16, "backend": "magic"}, "unknown backend 'magic'"),
        ({"in_features": 32, "out_features": 16, "transpose_mask_interval": 0}, "positive"),
        (
            {
                "in_features": 32,
                "out_features": 16,
                "weight": torch.ones(16, 32, dtype=torch.int32),
            },
            "floating-point weight",
        ),
    ],
)
def test_bad_construction_gets_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLinear(**kwargs, name="blocks.0.mlp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass", "auto"])
def test_gpu_backend_without_gpu_is_a_clear_error(backend):
    with pytest.raises(RuntimeError, match="CUDA GPU.*backend='reference'"):
        SparseLinear(32, 16, backend=backend)


def test_wrong_input_width_names_the_layer():
    layer = SparseLinear(32, 16, name="blocks.3.attn.q_proj")
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.q_proj.*expected 32"):
        layer(torch.randn(2, 31))


# ---------------------------------------------------------------- bad input and bad state


def test_the_state_dict_holds_only_tensors_so_safetensors_can_save_it(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(SparseLinear(32, 16))
    state = model.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    loaded = nn.Sequential(SparseLinear(32, 16))
    loaded.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    torch.testing.assert_close(loaded[0].to_dense(), model[0].to_dense())


@pytest.mark.parametrize(("saved", "target"), [((2, 8), (4, 16)), ((1, 8), (2, 16))])
def test_a_checkpoint_of_another_nm_pattern_is_refused_even_when_shapes_match(saved, target):
    source = SparseLinear(64, 32, n=saved[0], m=saved[1])
    dest = SparseLinear(64, 32, n=target[0], m=target[1])
    state = source.state_dict()
    assert state["values"].shape == dest.values.shape  # the packed shapes do match
    with pytest.raises(
        ValueError,
        match=rf"holds a {saved[0]}:{saved[1]} sparse weight.*n={saved[0]}, m={saved[1]}",
    ):
        dest.load_state_dict(state)


@pytest.mark.parametrize("buffer", ["row_index", "col_index"])
def test_packed_indices_that_are_not_a_valid_nm_pattern_are_refused_on_load(buffer):
    layer = SparseLinear(32, 16, name="blocks.0.attn.q_proj")
    state = layer.state_dict()
    state[buffer] = torch.full_like(state[buffer], 0xFF)  # offsets 3, 3: repeated
    with pytest.raises(ValueError, match=r"'blocks.0.attn.q_proj'.*not a valid 2:4 pattern"):
        SparseLinear(32, 16, name="blocks.0.attn.q_proj").load_state_dict(state)


def test_an_integer_input_is_an_error_not_zeros():
    layer = SparseLinear(32, 16, name="mlp.up")
    with pytest.raises(TypeError, match=r"'mlp.up': input dtype torch.int64 is not floating point"):
        layer(torch.ones(2, 32, dtype=torch.int64))


def test_from_linear_refuses_what_is_not_a_linear():
    with pytest.raises(TypeError, match="takes an nn.Linear, got Conv1d"):
        SparseLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_merge_for_inference_validates_every_layer_before_merging_any():
    from slope_lightning.sparse import merge_for_inference, sparsify

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    sparsify(model)
    with torch.no_grad():
        model[1].values[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in weight; not merged"):
        merge_for_inference(model)
    assert not model[0].merged and not model[1].merged  # nothing half-done
    with torch.no_grad():
        model[1].values[0, 0] = 0.0
    assert merge_for_inference(model) == 2  # a retry works
    with pytest.raises(RuntimeError, match="already merged.*unmerge"):
        merge_for_inference(model)
