"""A SLoPe-sparse model works under torch.compile: the sparse layers run eagerly inside the
compiled graph (their forward keeps Python-side state), everything else is compiled, and the
numbers equal the eager model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slope_lightning.sparse import add_adapters, merge_for_inference, sparsify
from slope_lightning.sparse.backends import AutoBackend
from test_gpu_backends import emulated


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def train(model: nn.Module, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_compiled_sparse_model_trains_like_the_eager_one(backend, tmp_path):
    def sparse_model() -> nn.Module:
        model = mlp()
        chosen = AutoBackend([emulated()]) if backend == "auto" else backend
        sparsify(model, backend=chosen)
        return model

    torch._dynamo.reset()
    eager, compiled = sparse_model(), sparse_model()
    expected = train(eager)
    assert train(torch.compile(compiled)) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        add_adapters(eager, rank=4, seed=0)
        add_adapters(compiled, rank=4, seed=0)
        merge_for_inference(eager)
        merge_for_inference(compiled)
        x = torch.randn(5, 64)
        torch.testing.assert_close(torch.compile(compiled)(x), eager(x))
