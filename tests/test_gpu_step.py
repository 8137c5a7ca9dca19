"""On a GPU: a SLoPe training step and a decode step make no host sync, and every
optimizer implementation leaves the 2:4 kernels' operands fresh. Skipped without CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from slope_lightning.sparse import (
    SparseLinear,
    add_adapters,
    follow_optimizer,
    merge_for_inference,
    sparsify,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise on any CUDA host synchronisation inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def mlp(backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda()
    sparsify(model, backend=backend)
    return model


@pytest.mark.parametrize("backend", ["cusparselt", "reference"])
def test_a_training_step_makes_no_host_sync(backend):
    model = mlp(backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    follow_optimizer(model, optimizer)
    x = torch.randn(64, 256, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # first step: lookup tables, algorithm search, optimizer state
    with no_host_sync():
        for _ in range(2):  # the second includes an M_C refresh
            step()


def test_a_merged_decode_step_makes_no_host_sync():
    model = mlp("cusparselt").to(torch.bfloat16)
    add_adapters(model, rank=16, seed=0)
    merge_for_inference(model)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # first call builds the merged operands
        with no_host_sync():
            for _ in range(3):
                model(x)


@pytest.mark.parametrize("fused", [True, False])
def test_after_a_fused_or_foreach_step_the_sparse_gemm_equals_the_reference(fused):
    torch.manual_seed(0)
    dense = nn.Linear(256, 256, device="cuda", dtype=torch.bfloat16)
    layer = SparseLinear.from_linear(dense, backend="cusparselt")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=fused, foreach=not fused)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        with torch.no_grad():
            layer(x)  # evaluation between steps fills the inference cache
        layer(x).float().pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    fresh = SparseLinear(256, 256, device="cuda", dtype=torch.bfloat16)
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(x), atol=2e-2, rtol=2e-2)
