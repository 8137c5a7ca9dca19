"""Bad weights and bad checkpoints end in one message that names the file and the fix, never
in a traceback (issue 19, "Tracebacks left"): InitFromPretrained's sources (a truncated
``.safetensors``, weights of other shapes, a ``.ckpt`` holding a pickled object, NaN/inf
weights) and a sharded (FSDP2) checkpoint directory with a shard missing or truncated.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from console import console, error_line
from lightning_helpers import write_corpus
from slope_lightning import sparsify
from slope_lightning.callbacks import InitFromPretrained
from slope_lightning.checkpoints import (
    CheckpointError,
    check_sharded_checkpoint,
    checkpoint_step,
    load_safetensors_file,
    resume_point,
)
from slope_lightning.sparse import sparse_layers

ROOT = Path(__file__).parents[1]


# --------------------------------------------------------------------------------------------
# InitFromPretrained
# --------------------------------------------------------------------------------------------


class Regression(pl.LightningModule):
    """A sparse MLP at ``self.model``, the attribute InitFromPretrained fills."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        sparsify(self.model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _dense_weights(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Weights of Regression's dense model, by name; ``shapes`` overrides some shapes."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).state_dict()
    for key, shape in shapes.items():
        dense[key.replace("_", ".")] = torch.randn(shape)
    return {k: v.contiguous() for k, v in dense.items()}


def _fit_from(source: Path) -> Regression:
    module = Regression()
    trainer = pl.Trainer(
        callbacks=[InitFromPretrained(source=str(source), mask_method="magnitude")],
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x = torch.randn(8, 16)
    trainer.fit(module, DataLoader(TensorDataset(x, x), batch_size=4))
    return module


def test_dense_safetensors_weights_enter_the_sparse_model(tmp_path):
    save_file(_dense_weights(), tmp_path / "dense.safetensors")
    module = _fit_from(tmp_path / "dense.safetensors")
    assert len(sparse_layers(module.model)) == 2  # loaded and pruned; trained one step


def test_a_truncated_safetensors_file_is_named_with_the_fix(tmp_path):
    path = tmp_path / "dense.safetensors"
    save_file(_dense_weights(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError) as info:
        _fit_from(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "again" in message
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_safetensors_file(tmp_path / "missing.safetensors")


def test_weights_of_another_shape_name_the_first_key_and_both_shapes(tmp_path):
    save_file(_dense_weights(**{"2_weight": (16, 64)}), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"2.weight is \(16, 64\) in the file but \(16, 32\)"):
        _fit_from(tmp_path / "wide.safetensors")


def test_non_finite_weights_are_refused_naming_the_key(tmp_path):
    weights = _dense_weights()
    weights["0.bias"][3] = float("nan")
    save_file(weights, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite weights: 0.bias \(1 NaN, 0 inf"):
        _fit_from(tmp_path / "nan.safetensors")


class _Payload:
    """Unpickling it creates ``marker``: stands in for arbitrary code in a crafted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_ckpt_holding_a_pickled_object_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "dense.ckpt"
    state = {f"model.{k}": v for k, v in _dense_weights().items()}
    torch.save({"state_dict": state, "evil": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        _fit_from(path)
    message = str(info.value)
    assert str(path) in message and "refusing" in message and "pickled" in message
    assert "weights_only=False" not in message  # torch's advice is not passed on
    assert not marker.exists()


def test_a_ckpt_without_the_models_weights_says_where_it_looked(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"no weights under 'model\.'.*net\.0\.weight"):
        _fit_from(path)


@pytest.mark.parametrize(
    "processes",
    [1, pytest.param(2, marks=pytest.mark.slow, id="2-ddp-processes")],
    ids=lambda n: f"{n}-process" if n == 1 else None,
)
def test_a_truncated_safetensors_through_the_console_script_is_one_error_line(tmp_path, processes):
    """Each rank fails alike inside the launched processes; only rank 0 prints, once."""
    path = tmp_path / "dense.safetensors"
    save_file(_dense_weights(), path)
    path.write_bytes(path.read_bytes()[:300])
    sources = write_corpus(tmp_path / "docs", documents=8, words=400)
    result = console(
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--data.sources=[{sources}]",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=2",
        "--model.model_overrides={n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=slope_lightning.callbacks.InitFromPretrained",
        f"--trainer.callbacks.source={path}",
        "--trainer.callbacks.mask_method=magnitude",
        *(
            [
                "--trainer.accelerator=cpu",
                f"--trainer.devices={processes}",
                "--trainer.strategy=ddp",
            ]
            if processes > 1
            else []
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert str(path) in line and "truncated" in line


# --------------------------------------------------------------------------------------------
# Sharded (FSDP2) checkpoint directories
# --------------------------------------------------------------------------------------------


def _sharded_checkpoint(path: Path, step: int = 4) -> Path:
    """A directory laid out as Lightning's ModelParallelStrategy writes it: the tensors through
    torch.distributed.checkpoint (``.metadata`` and ``__0_0.distcp``; one process, no process
    group), and ``meta.pt`` with the rest."""
    torch.manual_seed(0)
    state = {
        "state_dict": {"model.weight": torch.randn(8, 4), "model.bias": torch.randn(8)},
        "optimizer_0": {"state": {0: {"exp_avg": torch.zeros(8, 4)}}, "param_groups": []},
    }
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=path)
    torch.save({"global_step": step, "epoch": 0}, path / "meta.pt")
    return path


def test_a_complete_sharded_checkpoint_passes(tmp_path):
    path = _sharded_checkpoint(tmp_path / "last.ckpt")
    check_sharded_checkpoint(path)
    assert checkpoint_step(path) == 4


def test_a_sharded_checkpoint_with_a_shard_missing_names_the_folder_and_the_file(tmp_path):
    path = _sharded_checkpoint(tmp_path / "last.ckpt")
    (path / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError) as info:
        resume_point(str(path), None)
    message = str(info.value)
    assert f"sharded checkpoint {path} is incomplete" in message
    assert "__0_0.distcp is missing" in message


def test_a_sharded_checkpoint_with_a_truncated_shard_or_a_bad_index_is_refused(tmp_path):
    path = _sharded_checkpoint(tmp_path / "truncated.ckpt")
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="__0_0.distcp has 64 bytes"):
        checkpoint_step(path)
    path = _sharded_checkpoint(tmp_path / "no-index.ckpt")
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: it has no \.metadata"):
        checkpoint_step(path)
    path = _sharded_checkpoint(tmp_path / "bad-index.ckpt")
    (path / ".metadata").write_bytes(b"not an index")
    with pytest.raises(CheckpointError, match=r"cannot read .*\.metadata: it is truncated"):
        checkpoint_step(path)


def test_an_index_holding_code_is_refused_and_never_runs(tmp_path):
    path = _sharded_checkpoint(tmp_path / "last.ckpt")
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="refusing to load sharded checkpoint"):
        checkpoint_step(path)
    assert not marker.exists()


def test_validate_on_a_sharded_checkpoint_with_a_shard_missing_is_one_error_line(tmp_path):
    path = _sharded_checkpoint(tmp_path / "last.ckpt")
    (path / "__0_0.distcp").unlink()
    result = console(
        "validate",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--ckpt_path={path}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert str(path) in line and "__0_0.distcp is missing" in line


def test_a_corrupt_shard_found_while_lightning_restores_is_one_error_line():
    """torch.distributed.checkpoint's CheckpointException derives from BaseException; the CLI
    still turns it into exit 1 and one line that says what to do."""
    from torch.distributed.checkpoint.api import CheckpointException

    from slope_lightning.cli_errors import describe_failure

    error = CheckpointException("load", {0: (ValueError("bad bytes in __0_0.distcp"), None)})
    failure = describe_failure(error, "fit")
    assert failure is not None
    status, message = failure
    assert status == 1
    assert "sharded checkpoint" in message and "another checkpoint" in message
    assert "rank 0: ValueError: bad bytes in __0_0.distcp" in message
    assert "\n" not in message
