"""Lazy low-rank adapters: paper init, N:M-sparse L, exact merged inference path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slope_lightning import add_adapters, merge_for_inference, sparsify, unmerge
from slope_lightning.sparse import SparseLinear


def sparse_mlp(d=64, hidden=128, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)).to(dtype)
    sparsify(model)
    return model


def test_paper_init_leaves_the_function_unchanged_and_keeps_l_sparse():
    model = sparse_mlp()
    x = torch.randn(5, 64, dtype=torch.float64)
    before = model(x)
    params = add_adapters(model, rank=8, seed=0)
    assert len(params) == 4  # (Lᵀ values, R) for two layers
    torch.testing.assert_close(model(x), before)  # R = 0
    adapter = model[0].adapter
    assert adapter.rank == 8 and float(adapter.scale) == pytest.approx(1 / 8)
    down = adapter.down_dense()
    assert down.shape == (8, 64)
    assert (down != 0).view(8, -1, 4).sum(-1).le(2).all()  # Lᵀ is 2:4 along d_in


def test_fractional_rank_is_a_share_of_d_in():
    model = sparse_mlp()
    add_adapters(model, rank=0.0625)
    assert model[0].adapter.rank == 4 and model[2].adapter.rank == 8


def test_peft_init_uses_alpha_over_r():
    model = sparse_mlp()
    add_adapters(model, rank=4, init="peft", alpha=8.0)
    assert float(model[0].adapter.scale) == pytest.approx(2.0)


def train_a_little(model, steps=5, extra=()):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, target = torch.randn(16, 64, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_new_parameters_join_a_running_optimizer_and_train():
    model = sparse_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, target = torch.randn(16, 64, dtype=torch.float64), torch.randn(16, 64, dtype=torch.float64)
    params = add_adapters(model, rank=8, seed=0)
    optimizer.add_param_group({"params": params})
    up_before = model[0].adapter.up.detach().clone()
    for _ in range(3):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(model[0].adapter.up, up_before)
    assert (model[0].adapter.down_dense() != 0).view(8, -1, 4).sum(-1).le(2).all()


@pytest.mark.parametrize("rank", [None, 8])
def test_merged_and_unmerged_outputs_agree(rank):
    model = sparse_mlp()
    if rank is not None:
        add_adapters(model, rank=rank, seed=0)
    train_a_little(model)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        assert merge_for_inference(model) == 2
        assert all(layer.merged for layer in model if isinstance(layer, SparseLinear))
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-12, rtol=0)
    assert unmerge(model) == 2
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)  # unmerge is exact


def test_merge_refuses_twice_and_non_finite_values():
    model = sparse_mlp()
    add_adapters(model, rank=8)
    merge_for_inference(model)
    with pytest.raises(RuntimeError, match="already merged"):
        model[0].merge()
    unmerge(model)
    with torch.no_grad():
        model[0].adapter.up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in adapter R; not merged"):
        model[0].merge()
    assert not model[0].merged


def test_training_forward_unmerges_and_merged_cache_follows_updates():
    model = sparse_mlp()
    add_adapters(model, rank=8)
    merge_for_inference(model)
    x = torch.randn(4, 64, dtype=torch.float64)
    model(x).sum().backward()  # grad enabled: leaves the inference path
    assert not model[0].merged
    merge_for_inference(model)
    with torch.no_grad():
        model[0].values.mul_(2)  # an in-place update after merging
        merged = model(x)
    unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(merged, model(x))


def test_to_linear_folds_the_adapter_in():
    model = sparse_mlp()
    add_adapters(model, rank=8)
    train_a_little(model)
    layer = model[0]
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))


@pytest.mark.parametrize(
    ("rank", "match"),
    [
        (0, "0 < rank < min"),
        (64, "0 < rank < min"),
        (-1, "0 < rank"),
        (1.5, r"in \(0, 1\)"),
        ("8", "int or a float"),
    ],
)
def test_bad_ranks_are_rejected_naming_the_layer(rank, match):
    model = sparse_mlp()
    with pytest.raises(ValueError, match=match):
        add_adapters(model, rank=rank)


def test_adding_twice_or_to_a_dense_model_is_an_error():
    model = sparse_mlp()
    add_adapters(model, rank=4)
    with pytest.raises(RuntimeError, match="already has adapters"):
        add_adapters(model, rank=4)
    with pytest.raises(ValueError, match="call sparsify"):
        add_adapters(nn.Sequential(nn.Linear(8, 8)), rank=2)
