"""Fault handling: safe checkpoint loading, the crash checkpoint and the non-finite guard.

A toy LightningModule (one Linear layer) keeps every Trainer run well under a second; the
CLI-level behaviour (resume, exit status, the real model) is in test_cli.py.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from slope_lightning.callbacks import CrashCheckpoint, NonFiniteError, NonFiniteGuard
from slope_lightning.checkpoints import (
    CheckpointError,
    SafeCheckpointIO,
    checkpoint_step,
    find_resume_checkpoint,
    load_checkpoint_file,
)

# --------------------------------------------------------------------------------------------
# A toy model and run
# --------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class Toy(pl.LightningModule):
    """Linear regression that can produce a NaN loss or inf gradients at chosen steps."""

    def __init__(self, nan_loss_at: tuple[int, ...] = (), inf_grad_at: tuple[int, ...] = ()):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_loss_at = nan_loss_at
        self.inf_grad_at = inf_grad_at
        self.exported = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.layer(x)
        if self.global_step in self.inf_grad_at:
            out = _InfGrad.apply(out)
        loss = F.mse_loss(out, y)
        if self.global_step in self.nan_loss_at:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        self.exported = True  # stands in for SLoPeModule's export


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x.sum(-1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_steps": 6,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, Checkpoint) for c in callbacks),
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "plugins": [SafeCheckpointIO()],
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class Boom(pl.Callback):
    """Raises at a chosen global step, in a chosen hook (simulates a crash or Ctrl-C)."""

    def __init__(self, step: int, hook: str = "start", error: type = RuntimeError) -> None:
        self.step, self.hook, self.error = step, hook, error

    def _maybe(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            raise self.error(f"boom at step {self.step}")

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "start")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "end")

    def on_validation_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe(trainer, "validation")


class PoisonWeights(pl.Callback):
    """Writes a NaN into the weights after a chosen step (bypassing the gradient checks)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.layer.weight[0, 0] = float("nan")


def _ckpt(path: Path, step: int, **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(2)}, **extra}, path)
    return path


# --------------------------------------------------------------------------------------------
# Safe loading (item 7)
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling it creates ``marker``: stands in for arbitrary code in a crafted file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 5, "state_dict": {}, "evil": _Payload(marker)}, path)
    return path


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _payload_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert str(path) in message and "refusing" in message
    assert "tensors and plain containers" in message and "trust" in message  # why, and the fix
    assert "a pickled io.open" in message  # what it holds
    assert "weights_only=False" not in message  # torch's advice is never passed on
    assert not marker.exists()


def test_a_plain_pickle_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="last.ckpt"):
            load_checkpoint_file(path, mmap=mmap)
    assert not marker.exists()


def test_the_trainer_refuses_a_payload_through_safe_checkpoint_io(tmp_path):
    marker = tmp_path / "pwned"
    path = _payload_checkpoint(tmp_path / "last.ckpt", marker)
    trainer = _trainer(tmp_path, [])
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        trainer.fit(Toy(), _loader(), ckpt_path=str(path))
    assert not marker.exists()


def test_safe_checkpoint_io_refuses_weights_only_false(tmp_path):
    path = _ckpt(tmp_path / "a.ckpt", 3)
    with pytest.raises(CheckpointError, match="weights_only=False") as info:
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert "weights_only=True" in str(info.value)
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 3


def test_a_truncated_checkpoint_names_the_file_and_the_fix(tmp_path):
    path = _ckpt(tmp_path / "last.ckpt", 7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        checkpoint_step(path)
    message = str(info.value)
    assert str(path) in message and "truncated or corrupt" in message
    assert "resume from another checkpoint" in message


def test_a_file_that_is_not_a_checkpoint_dict_is_refused(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint dictionary"):
        load_checkpoint_file(path)


def test_a_checkpoint_without_global_step_is_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="records no global_step") as info:
        checkpoint_step(path)
    assert "written by the Trainer" in str(info.value)


def _sharded(path: Path, step: int) -> Path:
    """What ModelParallelStrategy writes: a directory of shards and rank 0's ``meta.pt``."""
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=path)  # .metadata, shards
    torch.save({"global_step": step, "epoch": 0}, path / "meta.pt")
    return path


def test_a_sharded_checkpoint_directory_is_read_from_its_metadata(tmp_path):
    path = _sharded(tmp_path / "last.ckpt", 12)
    assert checkpoint_step(path) == 12
    plain = tmp_path / "some-dir"
    plain.mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory but not a sharded Lightning"):
        checkpoint_step(plain)


def test_ckpt_path_last_finds_sharded_checkpoints_too(tmp_path):
    root = tmp_path / "runs" / "tiny-fsdp"
    older = _ckpt(root / "version_0" / "checkpoints" / "last.ckpt", 50)
    os.utime(older, (1, 1))
    sharded = _sharded(root / "version_1" / "checkpoints" / "last.ckpt", 40)
    assert find_resume_checkpoint(root) == (sharded, 40)  # the latest run, though a folder


def test_a_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_checkpoint_file(tmp_path / "nope.ckpt")
    assert "`last`" in str(info.value)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no stray file


# --------------------------------------------------------------------------------------------
# What `--ckpt_path last` picks
# --------------------------------------------------------------------------------------------


def _age(path: Path, seconds_ago: float) -> None:
    now = path.stat().st_mtime
    os.utime(path, (now - seconds_ago, now - seconds_ago))


def test_resume_picks_the_latest_run_then_its_most_advanced_checkpoint(tmp_path):
    root = tmp_path / "runs" / "tiny"
    old = _ckpt(root / "version_0" / "checkpoints" / "last.ckpt", 400)
    _age(old, 100)
    last = _ckpt(root / "version_1" / "checkpoints" / "last.ckpt", 100)
    crash = _ckpt(root / "version_1" / "crash" / "on_exception.ckpt", 150)
    _age(last, 10)
    (root / "version_2").mkdir()  # a run that failed before any checkpoint
    assert find_resume_checkpoint(root) == (crash, 150)
    _ckpt(crash, 100)  # same step: last.ckpt wins (a crash file may be mid-validation)
    assert find_resume_checkpoint(root) == (last, 100)
    assert find_resume_checkpoint(tmp_path / "elsewhere") is None


def test_resume_reports_an_unreadable_candidate_by_name(tmp_path):
    root = tmp_path / "runs"
    bad = root / "version_0" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        find_resume_checkpoint(root)


# --------------------------------------------------------------------------------------------
# NonFiniteGuard (item 1)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"action": "halt"}, "action='halt'"),
        ({"max_skips": -1}, "max_skips=-1"),
        ({"max_skips": 1.5}, "max_skips=1.5"),
        ({"max_skips": True}, "max_skips=True"),
    ],
)
def test_guard_arguments_are_validated(kwargs, needle):
    with pytest.raises(ValueError, match="NonFiniteGuard") as info:
        NonFiniteGuard(**kwargs)
    message = str(info.value)
    assert needle in message
    assert "stop, skip" in message or "int >= 0" in message  # the allowed values


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = Toy(nan_loss_at=(3,))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = _trainer(tmp_path, [NonFiniteGuard(), checkpoints])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(model, _loader())
    message = str(info.value)
    # Stop mode reads its device-side flag lazily; the next checkpoint save is refused.
    assert "refusing to write a checkpoint at global step 4" in message
    assert "non-finite loss at global step 3" in message
    assert "last.ckpt" in message and "lr" in message  # the last good state and the fix
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3
    assert torch.isfinite(last["state_dict"]["layer.weight"]).all()
    assert not model.exported


def test_stop_mode_finds_a_nan_on_the_next_logging_step(tmp_path):
    model = Toy(nan_loss_at=(3,))
    trainer = _trainer(tmp_path, [NonFiniteGuard()], max_steps=12, log_every_n_steps=5)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(model, _loader())
    assert trainer.global_step == 5  # steps 4 and 5 ran; read at the end of step 5
    assert "NonFiniteGuard at global step 5: non-finite loss at global step 3" in str(info.value)
    assert not model.exported


def test_a_nan_before_the_end_of_training_is_found_before_the_export(tmp_path):
    model = Toy(nan_loss_at=(4,))
    trainer = _trainer(tmp_path, [NonFiniteGuard()], log_every_n_steps=50)
    with pytest.raises(NonFiniteError, match="training ended at global step 6: non-finite loss"):
        trainer.fit(model, _loader())
    assert not model.exported


def test_no_checkpoint_is_written_once_a_non_finite_step_was_found(tmp_path):
    crash = CrashCheckpoint(dirpath=str(tmp_path / "crash"))
    model = Toy(inf_grad_at=(2,))
    trainer = _trainer(tmp_path, [NonFiniteGuard(), crash], max_steps=12, log_every_n_steps=4)
    with pytest.raises(NonFiniteError, match="gradient of layer.weight at global step 2"):
        trainer.fit(model, _loader())
    assert not (tmp_path / "crash" / "on_exception.ckpt").exists()
    # Any later save is refused, naming the original cause (not only the weights it left).
    with pytest.raises(NonFiniteError, match="refusing .* gradient of layer.weight at global"):
        trainer.save_checkpoint(tmp_path / "later.ckpt")
    assert not (tmp_path / "later.ckpt").exists()


def test_skip_mode_with_no_skips_stops_before_the_update_is_applied(tmp_path):
    model = Toy(nan_loss_at=(3,))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = _trainer(tmp_path, [NonFiniteGuard("skip", max_skips=0), checkpoints])
    with pytest.raises(NonFiniteError, match="non-finite loss at global step 3") as info:
        trainer.fit(model, _loader())
    assert "The update was not applied" in str(info.value)
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3
    # The bad update was never applied: the weights in memory are last.ckpt's.
    assert torch.equal(model.layer.weight.detach(), last["state_dict"]["layer.weight"])
    assert not model.exported


def test_inf_gradients_with_a_finite_loss_name_the_parameter(tmp_path):
    trainer = _trainer(tmp_path, [NonFiniteGuard()])
    with pytest.raises(NonFiniteError, match="at global step 2") as info:
        trainer.fit(Toy(inf_grad_at=(2,)), _loader())
    assert "gradient of layer." in str(info.value)


class _WeightsAround(pl.Callback):
    """Records the weights before and after each step."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, *args: Any) -> None:
        self.before[trainer.global_step] = pl_module.layer.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self.after[trainer.global_step - 1] = pl_module.layer.weight.detach().clone()


def test_skip_mode_drops_bad_steps_and_counts_them(tmp_path):
    model = Toy(nan_loss_at=(2,), inf_grad_at=(4,))
    guard = NonFiniteGuard("skip", max_skips=3)
    weights = _WeightsAround()
    trainer = _trainer(tmp_path, [guard, weights])
    trainer.fit(model, _loader())
    assert trainer.global_step == 6 and guard.skipped == 2
    for step in (2, 4):  # skipped: the weights did not move
        assert torch.equal(weights.before[step], weights.after[step])
    assert not torch.equal(weights.before[3], weights.after[3])
    state = trainer.optimizers[0].state[model.layer.weight]
    assert int(state["step"]) == 4  # AdamW took 6 - 2 steps; its state never saw a NaN
    assert torch.isfinite(model.layer.weight).all() and model.exported
    assert guard.state_dict() == {"skipped": 2}


def test_skip_mode_stops_once_max_skips_is_exceeded(tmp_path):
    trainer = _trainer(tmp_path, [NonFiniteGuard("skip", max_skips=1)])
    with pytest.raises(NonFiniteError, match="global step 2") as info:
        trainer.fit(Toy(nan_loss_at=(1, 2)), _loader())
    assert "max_skips=1" in str(info.value)


def test_the_skip_count_survives_a_resume():
    guard = NonFiniteGuard("skip", max_skips=2)
    guard.load_state_dict({"skipped": 2})
    assert guard.skipped == 2


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    crash = CrashCheckpoint(dirpath=str(tmp_path / "crash"))
    trainer = _trainer(tmp_path, [NonFiniteGuard(), PoisonWeights(step=3), checkpoints, crash])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(Toy(), _loader())
    message = str(info.value)
    assert "refusing to write a checkpoint at global step 3" in message
    assert "layer.weight" in message and "NaN" in message
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["layer.weight"]).all()
    assert not (tmp_path / "crash" / "on_exception.ckpt").exists()  # not from NaN weights


def test_training_that_ends_with_non_finite_weights_is_not_exported(tmp_path):
    model = Toy()
    trainer = _trainer(tmp_path, [NonFiniteGuard(), PoisonWeights(step=6)])
    with pytest.raises(NonFiniteError, match="not exported") as info:
        trainer.fit(model, _loader())
    assert "global step 6" in str(info.value) and "lower learning rate" in str(info.value)
    assert not model.exported


# --------------------------------------------------------------------------------------------
# CrashCheckpoint (items 2 and 11)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["", "a/b"])
def test_crash_checkpoint_filename_is_validated(filename):
    with pytest.raises(ValueError, match="plain file name"):
        CrashCheckpoint(filename=filename)


def test_crash_checkpoint_is_not_lightnings_auto_resuming_kind():
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    # Lightning turns fit(ckpt_path=None) into "last" when an OnExceptionCheckpoint is present.
    assert not isinstance(CrashCheckpoint(), OnExceptionCheckpoint)


def test_an_exception_during_training_writes_a_resumable_crash_checkpoint(tmp_path):
    crash = CrashCheckpoint()
    model = Toy()
    trainer = _trainer(tmp_path, [Boom(step=4), crash])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, _loader())
    path = tmp_path / "crash" / "on_exception.ckpt"  # default: <log dir>/crash
    checkpoint = load_checkpoint_file(path)
    assert checkpoint["global_step"] == 4
    assert torch.equal(checkpoint["state_dict"]["layer.weight"], model.layer.weight.detach())
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    resumed = _trainer(tmp_path, [CrashCheckpoint()])
    resumed.fit(Toy(), _loader(), ckpt_path=str(path))
    assert resumed.global_step == 6
    assert not path.exists()  # the finished run's final state supersedes it


def test_a_failed_start_keeps_the_real_crash_checkpoint(tmp_path, caplog):
    crash_dir = tmp_path / "crash"
    trainer = _trainer(tmp_path, [Boom(step=4), CrashCheckpoint(str(crash_dir))])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Toy(), _loader())
    path = crash_dir / "on_exception.ckpt"
    before = path.read_bytes()
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(before[: len(before) // 3])
    restart = _trainer(tmp_path, [CrashCheckpoint(str(crash_dir))])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        restart.fit(Toy(), _loader(), ckpt_path=str(corrupt))
    assert path.read_bytes() == before  # not replaced by a step-0 model


def test_an_older_state_never_replaces_a_newer_crash_checkpoint(tmp_path, caplog):
    crash_dir = tmp_path / "crash"
    newer = _trainer(tmp_path, [Boom(step=5), CrashCheckpoint(str(crash_dir))])
    with pytest.raises(RuntimeError):
        newer.fit(Toy(), _loader())
    path = crash_dir / "on_exception.ckpt"
    before = path.read_bytes()
    older = _trainer(tmp_path, [Boom(step=2), CrashCheckpoint(str(crash_dir))])
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError):
        older.fit(Toy(), _loader())
    assert path.read_bytes() == before
    assert "kept" in caplog.text and "global step 5" in caplog.text


def test_no_crash_checkpoint_without_a_step_since_the_start(tmp_path, caplog):
    trainer = _trainer(tmp_path, [Boom(step=0), CrashCheckpoint()])
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError):
        trainer.fit(Toy(), _loader())
    assert not (tmp_path / "crash").exists()
    assert "no optimizer step since this run started" in caplog.text


def test_no_crash_checkpoint_for_a_failure_in_the_sanity_check(tmp_path):
    trainer = _trainer(
        tmp_path,
        [Boom(step=0, hook="validation"), CrashCheckpoint()],
        num_sanity_val_steps=1,
        limit_val_batches=1,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Toy(), _loader(), _loader())
    assert not (tmp_path / "crash").exists()


def test_a_keyboard_interrupt_writes_the_crash_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, [Boom(step=3, error=KeyboardInterrupt), CrashCheckpoint()])
    with pytest.raises(SystemExit):  # Lightning exits after its graceful shutdown
        trainer.fit(Toy(), _loader())
    assert trainer.interrupted
    assert checkpoint_step(tmp_path / "crash" / "on_exception.ckpt") == 3
