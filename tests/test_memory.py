"""memory_report counts model state exactly, by category."""

from __future__ import annotations

import torch
from torch import nn

from slope_lightning import add_adapters, memory_report, merge_for_inference, sparsify


def step(model, optimizer):
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()


def test_dense_model_counts_parameters_gradients_and_adam_state():
    model = nn.Sequential(nn.Linear(64, 32))
    optimizer = torch.optim.AdamW(model.parameters())
    step(model, optimizer)
    report = memory_report(model, optimizer)
    params = (64 * 32 + 32) * 4
    assert report.bytes["dense parameters"] == params
    assert report.bytes["gradients"] == params
    # exp_avg + exp_avg_sq per parameter, plus a 4-byte float32 step per parameter tensor
    assert report.bytes["optimizer state"] == 2 * params + 2 * 4
    assert report.total == 4 * params + 8


def test_sparse_layer_state_is_exact_and_about_half():
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    sparsify(model)
    optimizer = torch.optim.AdamW(model.parameters())
    step(model, optimizer)
    report = memory_report(model, optimizer)
    values = 32 * 32 * 4
    assert report.bytes["sparse values"] == values
    assert report.bytes["metadata"] == 32 * 32 // 4 + 64 * 16 // 4  # M_R + M_C, 2 bits/value
    assert report.bytes["gradients"] == values
    assert report.bytes["optimizer state"] == 2 * values + 4
    assert report.bytes["dense parameters"] == 0


def test_adapters_and_merge_caches_are_counted():
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    sparsify(model)
    add_adapters(model, rank=4)
    report = memory_report(model)
    assert report.bytes["sparse values"] == (32 * 32 + 4 * 32) * 4  # W_R values + Lᵀ values
    assert report.bytes["dense parameters"] == 4 * 32 * 4  # R
    assert report.bytes["buffers"] == 4  # the adapter scale
    merge_for_inference(model)
    assert memory_report(model).bytes["caches"] > 0


def test_tied_parameters_are_counted_once():
    embed = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embed.weight
    report = memory_report(nn.ModuleList([embed, head]))
    assert report.bytes["dense parameters"] == 10 * 8 * 4
    assert "total" in str(report)


def test_the_transposable_baselines_mask_cache_is_counted_as_a_cache():
    from slope_lightning.baselines import transposable_sparsify

    model = nn.Sequential(nn.Linear(64, 32))
    transposable_sparsify(model, include=["0"], backend="reference")
    assert memory_report(model).bytes["caches"] == 0  # nothing built before the first forward
    model(torch.randn(4, 64))  # training: the mask lives until the backward, not longer
    assert memory_report(model).bytes["caches"] == 0
    with torch.no_grad():
        model(torch.randn(4, 64))  # evaluation keeps it for the next call
    assert memory_report(model).bytes["caches"] == 64 * 32  # one bool per weight entry
