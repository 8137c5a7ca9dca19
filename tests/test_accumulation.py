"""Gradient accumulation with SLoPe: the loss of an optimizer step over micro-batches equals the
loss of the same global batch in one piece, and every micro-batch of a step uses the M_C of
that step's W_R (MaskScheduler re-derives it once, before the step's first forward; the
default interval re-derives it at every training forward, from the same W_R: the same M_C)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_helpers import write_corpus
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.data import TextDataModule
from slope_lightning.module import OptimizerConfig, SLoPeModule
from slope_lightning.sparse import sparse_layers

SMALL = {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root / "docs", documents=8), str(root / "cache")


class MicroBatches(pl.Callback):
    """Per micro-batch: its loss, the optimizer step it belongs to, and every layer's M_C
    (and its refresh count) as the forward saw it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        layers = sparse_layers(pl_module)
        self.rows.append(
            {
                "step": self._step,
                "loss": float(loss) * trainer.accumulate_grad_batches,  # Lightning divides
                "col_index": [layer.col_index.clone() for _, layer in layers],
                "generation": [layer._mask_generation for _, layer in layers],
            }
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step


def train(
    corpus: tuple[str, str],
    root: Path,
    batch_size: int,
    accumulate: int,
    callbacks: list[pl.Callback],
    steps: int = 4,
) -> tuple[SLoPeModule, MicroBatches]:
    pl.seed_everything(13)
    sources, cache = corpus
    data = TextDataModule(
        sources=[sources], cache_dir=cache, vocab_size=300, seq_len=32, batch_size=batch_size
    )
    module = SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides=SMALL,
        optimizer=OptimizerConfig(lr=3e-3, warmup=1),
    )
    micro = MicroBatches()
    trainer = pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[*callbacks, micro],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module, micro


def step_losses(micro: MicroBatches) -> dict[int, float]:
    """The loss of each optimizer step: the mean over its (equal-sized) micro-batches."""
    by_step: dict[int, list[float]] = {}
    for row in micro.rows:
        by_step.setdefault(row["step"], []).append(row["loss"])
    return {step: sum(losses) / len(losses) for step, losses in by_step.items()}


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [True, False], ids=["MaskScheduler", "layer-interval"])
def test_accumulated_micro_batches_train_like_the_global_batch(corpus, tmp_path, scheduler):
    def callbacks() -> list[pl.Callback]:
        # Adapters from step 2 of 4: accumulation before and after they switch on.
        adapters: list[pl.Callback] = [LazyLoRA(start=2, rank=4)]
        return [MaskScheduler(every=1), *adapters] if scheduler else adapters

    whole, one = train(corpus, tmp_path / "whole", 8, 1, callbacks())
    split, four = train(corpus, tmp_path / "split", 2, 4, callbacks())
    expected, got = step_losses(one), step_losses(four)
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    reference = whole.state_dict()
    for key, value in split.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=1e-5, msg=key)
        else:  # the masks M_R, M_C and the refresh counters
            assert torch.equal(value, reference[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [True, False], ids=["MaskScheduler", "layer-interval"])
def test_every_micro_batch_of_a_step_uses_the_mc_of_that_steps_w_r(corpus, tmp_path, scheduler):
    callbacks: list[pl.Callback] = [MaskScheduler(every=1)] if scheduler else []
    _, micro = train(corpus, tmp_path, 2, 3, callbacks, steps=4)
    assert len(micro.rows) == 12  # 4 optimizer steps x 3 micro-batches
    firsts = []
    for step in range(4):
        rows = [row for row in micro.rows if row["step"] == step]
        assert len(rows) == 3
        firsts.append(rows[0])
        for row in rows[1:]:
            for a, b in zip(row["col_index"], rows[0]["col_index"], strict=True):
                assert torch.equal(a, b)
    # M_C follows W_R from one optimizer step to the next.
    assert not torch.equal(firsts[0]["col_index"][0], firsts[-1]["col_index"][0])
    if scheduler:  # one refresh per optimizer step after the first
        generations = [row["generation"][0] for row in micro.rows]
        assert generations[0] == 0 and generations[-1] == 3
