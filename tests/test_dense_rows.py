"""Dense weights in by rows on one process: a generic model with buffers and a scalar step
count loads as ``load_state_dict`` would, and a buffer the file lacks is missing, never left
as uninitialised memory. (Sharded and meta loads on several processes: tests/test_fsdp.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slope_lightning.sparse import load_dense_safetensors, sparsify


def _dense() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 8))
    model.train()
    model(torch.randn(32, 8))  # running statistics and num_batches_tracked (a scalar) move
    return model


def _sparse(device: str = "cpu") -> nn.Sequential:
    with torch.device(device):
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 8))
    sparsify(model)
    return model


def test_a_model_with_buffers_and_a_scalar_loads_like_load_state_dict(tmp_path: Path) -> None:
    dense = _dense()
    path = tmp_path / "dense.safetensors"
    save_file(dense.state_dict(), str(path))
    for device in ("cpu", "meta"):
        model = _sparse(device)
        assert load_dense_safetensors(model, path) == ([], [])
        batch_norm = model[1]
        assert torch.equal(batch_norm.running_var, dense[1].running_var)
        assert int(batch_norm.num_batches_tracked) == 1
        reference = _sparse()
        from slope_lightning.sparse import load_dense_state_dict

        load_dense_state_dict(reference, dense.state_dict())
        for key, value in reference.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(model.state_dict()[key], value), (device, key)


def test_a_buffer_the_file_lacks_is_named_missing_not_left_uninitialised(tmp_path: Path) -> None:
    state = {k: v for k, v in _dense().state_dict().items() if "running" not in k}
    path = tmp_path / "no-stats.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing \['1\.running_mean', '1\.running_var'\]"):
        load_dense_safetensors(_sparse("meta"), path)
    model = _sparse()
    loaded = load_dense_safetensors(model, path, strict=False)
    assert loaded.missing_keys == ["1.running_mean", "1.running_var"]


def test_a_tied_head_stored_once_loads_into_a_plain_model_as_by_rows(tmp_path: Path) -> None:
    """A dense run's export stores a tied embedding once: load_dense_state_dict on a plain
    model accepts it (as the row path does) and gives the same state."""
    from slope_lightning.models import TransformerConfig, build_model
    from slope_lightning.sparse import load_dense_state_dict
    from slope_lightning.sparse.config import SparsityConfig

    config = TransformerConfig.from_name(
        "tiny", n_layer=1, d_model=32, n_head=2, n_kv_head=1, vocab_size=64, seq_len=16
    )
    dense, _ = build_model(config, SparsityConfig(sparse=False))
    state = {k: v for k, v in dense.state_dict().items() if k != "lm_head.weight"}
    path = tmp_path / "export.safetensors"
    save_file(state, str(path))
    plain, _ = build_model(config, SparsityConfig())
    load_dense_state_dict(plain, state)
    by_rows, _ = build_model(config, SparsityConfig())
    load_dense_safetensors(by_rows, path)
    assert plain.lm_head.weight is plain.tok_embed.weight
    for key, value in by_rows.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(plain.state_dict()[key], value), key
