"""SparseLinear under Lightning's precision settings, on CPU: ``bf16-mixed`` (fp32 master values
and AdamW state, the GEMMs in bf16, the GPU backends' logic given bf16 operands), ``16-mixed``
(the grad scaler skips inf/NaN steps, and its state rides in checkpoints) and ``bf16-true``.

Lightning turns ``precision="16-mixed"`` into bf16 on CPU; the tests pass its MixedPrecision
plugin with a CPU GradScaler instead, which torch supports (fp16 autocast on CPU)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_helpers import LossRecorder, write_corpus
from slope_lightning.callbacks import MaskScheduler
from slope_lightning.data import TextDataModule
from slope_lightning.module import OptimizerConfig, SLoPeModule, SparsityConfig
from slope_lightning.sparse import sparse_layers
from slope_lightning.sparse.backends.ops import EmulatedOps
from slope_lightning.sparse.state import check_index

# d 64, KV 32, MLP 192: every operand a multiple of 16 rows and 64 columns, as the emulated
# cuSPARSELt backend checks.
SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "docs", documents=8), str(root / "cache")


def make_data(corpus: tuple[str, str]) -> TextDataModule:
    sources, cache = corpus
    return TextDataModule(
        sources=[sources], cache_dir=cache, vocab_size=300, seq_len=32, batch_size=4
    )


def make_module(backend: str = "reference") -> SLoPeModule:
    return SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=SMALL,
        sparsity=SparsityConfig(backend=backend),
        optimizer=OptimizerConfig(lr=3e-3, warmup=1),
    )


def make_trainer(root: Path, max_steps: int, callbacks: list[pl.Callback], **kwargs: Any):
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=[MaskScheduler(every=1), *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


class Snapshots(pl.Callback):
    """Every parameter before each optimizer step (after backward) and after the last."""

    def __init__(self) -> None:
        self.before: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_bf16_mixed_keeps_fp32_masters_and_feeds_the_gpu_backend_bf16(
    corpus, tmp_path, monkeypatch
):
    seen: list[tuple[str, torch.dtype]] = []
    compress, matmul = EmulatedOps.compress, EmulatedOps.matmul

    def spy_compress(self: EmulatedOps, dense: torch.Tensor) -> Any:
        seen.append(("operand", dense.dtype))
        return compress(self, dense)

    def spy_matmul(self: EmulatedOps, packed: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(("activation", x.dtype))
        return matmul(self, packed, x, *args)

    monkeypatch.setattr(EmulatedOps, "compress", spy_compress)
    monkeypatch.setattr(EmulatedOps, "matmul", spy_matmul)
    module = make_module(backend="emulated")
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, 3, [recorder], precision="bf16-mixed")
    trainer.fit(module, datamodule=make_data(corpus))

    assert all(torch.isfinite(torch.tensor(v)) for v in recorder.losses.values())
    # Forward (W_R) and input gradient (W_RCᵀ) operands, and what they multiply: all bf16.
    assert {kind for kind, _ in seen} == {"operand", "activation"}
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    # The master copy of the sparse values, their gradients and AdamW's moments stay fp32.
    optimizer = trainer.optimizers[0]
    for _, layer in sparse_layers(module):
        assert layer.values.dtype == torch.float32
        state = optimizer.state[layer.values]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def test_bf16_mixed_reference_backend_trains_like_fp32_to_bf16_rounding(corpus, tmp_path):
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(3)
        recorder = LossRecorder()
        trainer = make_trainer(tmp_path / precision, 3, [recorder], precision=precision)
        trainer.fit(make_module(), datamodule=make_data(corpus))
        losses[precision] = recorder.losses
    for step, loss in losses["32-true"].items():
        assert losses["bf16-mixed"][step] == pytest.approx(loss, rel=2e-2)


class InjectInf(pl.Callback):
    """Puts an inf into one sparse layer's (scaled) gradient at one optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            _, layer = sparse_layers(pl_module)[0]
            assert layer.values.grad is not None
            layer.values.grad.view(-1)[0] = float("inf")


class ScaleAtStart(pl.Callback):
    def __init__(self) -> None:
        self.scale: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.scale = trainer.precision_plugin.scaler.get_scale()


def fp16_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_16_mixed_skips_the_inf_step_and_checkpoints_the_scaler(corpus, tmp_path):
    pl.seed_everything(5)
    module = make_module()
    snapshots, recorder = Snapshots(), LossRecorder()
    plugin = fp16_plugin()
    trainer = make_trainer(tmp_path, 4, [snapshots, recorder, InjectInf(step=1)], plugins=[plugin])
    trainer.fit(module, datamodule=make_data(corpus))
    assert trainer.precision_plugin.precision == "16-mixed"  # fp16 autocast, on CPU
    assert all(torch.isfinite(torch.tensor(v)) for v in recorder.losses.values())
    final = {n: p.detach() for n, p in module.named_parameters()}
    steps = [*snapshots.before, final]
    changed = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in itertools.pairwise(steps)]
    # The batch at optimizer step 1 had an inf gradient: the scaler skipped its update (no
    # parameter moved) and halved its scale; every other step updated the weights.
    assert changed[1] is False
    assert all(changed[i] for i in range(len(changed)) if i != 1)
    scale = plugin.scaler.get_scale()
    assert scale == 2.0**16 / 2  # GradScaler's initial scale, halved once

    path = tmp_path / "fp16.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["MixedPrecision"]["scale"] == scale
    resumed_plugin, start = fp16_plugin(), ScaleAtStart()
    resumed = make_trainer(tmp_path / "resumed", 6, [start], plugins=[resumed_plugin])
    resumed.fit(make_module(), datamodule=make_data(corpus), ckpt_path=path)
    assert start.scale == scale  # restored before the first resumed step


def test_bf16_true_trains_the_sparse_values_in_bf16(corpus, tmp_path):
    pl.seed_everything(7)
    module = make_module()
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, 6, [recorder], precision="bf16-true")
    trainer.fit(module, datamodule=make_data(corpus))
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    for _, layer in sparse_layers(module):
        assert layer.values.dtype == torch.bfloat16
        assert layer.row_index.dtype == layer.col_index.dtype == torch.uint8  # masks untouched
        check_index(layer.col_index, layer.layout.transposed(), "col_index", layer.name)
