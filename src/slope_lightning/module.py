"""SLoPeModule: a LightningModule that pretrains a (sparse) decoder-only transformer.

The same config trains the dense baseline with ``sparsity.sparse: false``, so the two runs
differ in nothing else. Its settings are three typed configs, each defined where it belongs:
:class:`~slope_lightning.models.TransformerConfig` (the model),
:class:`~slope_lightning.sparse.config.SparsityConfig` (the method, torch-only) and
:class:`~slope_lightning.optim.OptimizerConfig` (AdamW and the schedule); the latter two are
re-exported here for code that imports them as ``slope_lightning.module.*``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor
from torchmetrics.text import Perplexity
from typing_extensions import override

from slope_lightning.export import export_model
from slope_lightning.faults import NonFiniteError
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.optim import OptimizerConfig, build_adamw, lr_multiplier
from slope_lightning.sparse import (
    SparsifyReport,
    backend_report,
    follow_optimizer,
    memory_report,
    sparsify,
    use_decision_store,
)
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig

__all__ = ["OptimizerConfig", "SLoPeModule", "SparsityConfig", "lr_multiplier"]

logger = logging.getLogger(__name__)

C = TypeVar("C", SparsityConfig, OptimizerConfig)


@rank_zero_only
def _info(message: str, *args: object) -> None:
    logger.info(message, *args)


class SLoPeModule(pl.LightningModule):
    """Pretrain a LLaMA- or GPT-2-style transformer with SLoPe (or dense, for the baseline).

    ``hparams.yaml`` and TensorBoard's HPARAMS tab record every argument, ``sparsity`` and
    ``optimizer`` as plain dicts (so checkpoints load with ``weights_only=True`` and
    :meth:`load_from_checkpoint` rebuilds the module from them).

    Args:
        preset: model preset name ("tiny", "gpt2-small", "gpt2-medium", "llama-1b").
        vocab_size: vocabulary size (linked from the data module by the CLI).
        seq_len: context length (linked from the data module by the CLI).
        model_overrides: TransformerConfig fields that replace the preset's, e.g.
            ``{n_layer: 2, d_model: 128}``.
        sparsity: sparsification settings (see :class:`SparsityConfig`); a mapping of its
            fields (a checkpoint's hyperparameters) is accepted too.
        optimizer: AdamW and schedule settings (see :class:`OptimizerConfig`); a mapping of
            its fields is accepted too.
        export_dir: where the final model goes as safetensors + config.json when training
            ends (None: ``<log dir>/export``).

    Raises:
        ValueError: on an unknown preset or override, or invalid sparsity or optimizer
            settings (the message names the field).
    """

    def __init__(
        self,
        preset: str = "tiny",
        vocab_size: int | None = None,
        seq_len: int | None = None,
        model_overrides: dict[str, Any] | None = None,
        sparsity: SparsityConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.sparsity = _as_config(sparsity, SparsityConfig)
        self.optim = _as_config(optimizer, OptimizerConfig)
        # Every argument, the two configs as plain dicts: they reach hparams.yaml and the
        # HPARAMS tab, and checkpoints stay loadable with weights_only.
        self.save_hyperparameters(
            {
                "preset": preset,
                "vocab_size": vocab_size,
                "seq_len": seq_len,
                "model_overrides": model_overrides,
                "sparsity": self.sparsity.to_dict(),
                "optimizer": self.optim.to_dict(),
                "export_dir": export_dir,
            }
        )
        overrides = dict(model_overrides or {})
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        if seq_len is not None:
            overrides["seq_len"] = seq_len
        try:
            self.config = TransformerConfig.from_name(preset, **overrides)
        except ValueError as error:
            raise ValueError(f"model.preset / model.model_overrides: {error}") from error
        self.model = Transformer(self.config)
        self.sparsify_report: SparsifyReport | None = None
        if self.sparsity.sparse:
            self.sparsify_report = sparsify(self.model, self.sparsity)
            self.sparsify_report.require_converted()  # a "sparse" run that is dense is an error
        self.export_dir = export_dir
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        self._logged_param_count = -1

    # ------------------------------------------------------------------ steps

    @override
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.model(idx, targets)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, loss = self.model(x, y)
        self.val_ppl.update(logits.float(), y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits, loss = self.model(x, y)
        self.test_ppl.update(logits.float(), y)
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/ppl", self.test_ppl)

    # ------------------------------------------------------------------ setup and logging

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        tokenizer_vocab = tokenizer.get_vocab_size() if tokenizer is not None else None
        if tokenizer_vocab is not None and tokenizer_vocab > self.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; set data.vocab_size (linked to the model) to at "
                f"least {tokenizer_vocab} or use a smaller tokenizer"
            )
        if self.sparsify_report is not None and stage == "fit":
            _info("%s", self.sparsify_report)
        if self.sparsify_report is not None and self.sparsity.backend is BackendName.auto:
            # auto's measured decisions belong to this run: kept in its own directory (rank 0
            # measures and writes, the others receive its decisions), never in a file that
            # other runs on the machine share. trainer.log_dir is a collective under DDP.
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            store = use_decision_store(self.model, log_dir / "autotune.json")
            _info("auto backend decisions are kept in %s", store.describe())

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Model-state memory: once the optimizer state exists (after the first step) and
        # again whenever parameters are added (lazy adapters).
        if self.trainer.global_step == 1 and self.sparsity.backend is BackendName.auto:
            _info("backends chosen at first use:\n%s", backend_report(self.model))
        count = sum(1 for _ in self.parameters())
        if self.trainer.global_step >= 1 and count != self._logged_param_count:
            self._logged_param_count = count
            self._log_memory()

    def _log_memory(self) -> None:
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's wrapper
        report = memory_report(self.model, optimizer)
        metrics = {
            f"memory/{name.replace(' ', '_')}_MiB": count / 2**20
            for name, count in report.as_dict().items()
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            metrics["memory/cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=self.trainer.global_step)
        _info("model-state memory at step %d:\n%s", self.trainer.global_step, report)

    @override
    def on_train_end(self) -> None:
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.trainer.is_global_zero:
            return
        target = Path(self.export_dir) if self.export_dir else Path(log_dir) / "export"
        bad = next((n for n, p in self.model.named_parameters() if not p.isfinite().all()), None)
        if bad is not None:  # also without NonFiniteGuard: never export NaN weights
            raise NonFiniteError(
                f"refusing to export: parameter {bad} holds NaN/inf at global step "
                f"{self.trainer.global_step}; resume from the last good checkpoint "
                "(--ckpt_path last) with a lower learning rate, or add NonFiniteGuard"
            )
        export_model(self.model, self.config, self.sparsity, target)
        _info("exported the final model to %s", target)

    # ------------------------------------------------------------------ optimizer

    @override
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError(
                "SLoPeModule schedules the learning rate over trainer.max_steps; set "
                "trainer.max_steps to a positive number of optimizer steps"
            )
        optimizer, scheduler = build_adamw(self.model, self.optim, total_steps)
        # M_C refreshes count optimizer steps through a step hook, so the fused AdamW used
        # on CUDA (which moves no version counter) refreshes it like any other optimizer.
        follow_optimizer(self.model, optimizer)
        decay, no_decay = (group["params"] for group in optimizer.param_groups)
        _info(
            "AdamW: %d decayed tensors (%d values), %d not decayed (%d values)",
            len(decay),
            sum(p.numel() for p in decay),
            len(no_decay),
            sum(p.numel() for p in no_decay),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def _as_config(value: object, cls: type[C]) -> C:
    """``value`` as a ``cls``: None gives the defaults, a mapping (a checkpoint's
    hyperparameters, which store the configs as dicts) goes through ``cls.from_dict``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)
    raise ValueError(f"expected a {cls.__name__} or a mapping of its fields, got {value!r}")
