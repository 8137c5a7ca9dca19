"""SLoPeModule: a LightningModule that pretrains a (sparse) decoder-only transformer.

The same config trains the dense baseline with ``sparsity.sparse: false``, so the two runs
differ in nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from typing_extensions import override

from slope_lightning.export import export_model
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import (
    DEFAULT_EXCLUDE,
    SparsifyReport,
    backend_report,
    memory_report,
    restore_adapters,
    sparsify,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsityConfig:
    """How the transformer's block linears are sparsified (YAML section ``model.sparsity``).

    Attributes:
        sparse: False trains the dense baseline under the same config.
        n: kept entries per group (2 for 2:4).
        m: group size (4 for 2:4).
        backend: GEMM backend: "reference" (plain torch, any device) or a GPU backend:
            "cusparselt", "cutlass" (either "+tiled" to cut tall weights into square tiles)
            or "auto" (per layer, the fastest measured; bf16/fp16 precision needed).
        include: fnmatch patterns of layer names to sparsify (None: all block linears).
        exclude: patterns left dense (None: LM head and embeddings).
        max_aspect_ratio: leave layers with max(d_out/d_in, d_in/d_out) above this dense.
        transpose_mask_interval: optimizer steps between re-derivations of M_C when no
            MaskScheduler callback is attached (a MaskScheduler owns the schedule).
        mask_method: row mask by "magnitude" (the paper) or "random".
    """

    sparse: bool = True
    n: int = 2
    m: int = 4
    backend: Literal[
        "reference", "cusparselt", "cusparselt+tiled", "cutlass", "cutlass+tiled", "auto"
    ] = "reference"
    include: list[str] | None = None
    exclude: list[str] | None = None
    max_aspect_ratio: float | None = None
    transpose_mask_interval: int | None = 1
    mask_method: Literal["magnitude", "random"] = "magnitude"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (YAML section ``model.optimizer``).

    Attributes:
        lr: peak learning rate.
        weight_decay: applied to matrices (rank >= 2: linear values, embeddings) only;
            biases and norm gains are not decayed.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup: warmup length: a fraction of max_steps if < 1 (the paper: 1%), else steps.
        schedule: decay after warmup: "cosine", "linear" (the paper) or "constant".
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        fused: use torch's fused AdamW (None: when all parameters are on CUDA).
    """

    lr: float = 6e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: float = 0.01
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    fused: bool | None = None


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then the configured decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class SLoPeModule(pl.LightningModule):
    """Pretrain a LLaMA- or GPT-2-style transformer with SLoPe (or dense, for the baseline).

    Args:
        preset: model preset name ("tiny", "gpt2-small", "gpt2-medium", "llama-1b").
        vocab_size: vocabulary size (linked from the data module by the CLI).
        seq_len: context length (linked from the data module by the CLI).
        model_overrides: TransformerConfig fields that replace the preset's, e.g.
            ``{n_layer: 2, d_model: 128}``.
        sparsity: sparsification settings (see :class:`SparsityConfig`).
        optimizer: AdamW and schedule settings (see :class:`OptimizerConfig`).
        export_dir: where the final model goes as safetensors + config.json when training
            ends (None: ``<log dir>/export``).

    Raises:
        ValueError: on an unknown preset or override, or invalid optimizer settings.
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
        self.sparsity = sparsity or SparsityConfig()
        self.optim = optimizer or OptimizerConfig()
        # Plain dicts, not dataclass instances: checkpoints stay loadable with weights_only.
        self.save_hyperparameters(ignore=["sparsity", "optimizer"])
        self.hparams["sparsity"] = dataclasses.asdict(self.sparsity)
        self.hparams["optimizer"] = dataclasses.asdict(self.optim)
        _validate_optimizer(self.optim)
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
            s = self.sparsity
            self.sparsify_report = sparsify(
                self.model,
                s.n,
                s.m,
                backend=s.backend,
                include=s.include,
                exclude=tuple(s.exclude) if s.exclude is not None else DEFAULT_EXCLUDE,
                max_aspect_ratio=s.max_aspect_ratio,
                transpose_mask_interval=s.transpose_mask_interval,
                mask_method=s.mask_method,
            )
        self.export_dir = export_dir
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        self._logged_param_count = -1

    # ------------------------------------------------------------------ steps

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
            logger.info("%s", self.sparsify_report)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lazy adapters switched on before the checkpoint was saved must exist before its
        # weights load, in fit, validate and test alike.
        restore_adapters(self, checkpoint.get("state_dict", {}))

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Model-state memory: once the optimizer state exists (after the first step) and
        # again whenever parameters are added (lazy adapters).
        if self.trainer.global_step == 1 and self.sparsity.backend == "auto":
            logger.info("backends chosen at first use:\n%s", backend_report(self.model))
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
        logger.info("model-state memory at step %d:\n%s", self.trainer.global_step, report)

    @override
    def on_train_end(self) -> None:
        # trainer.log_dir is a collective under DDP: every rank must ask for it.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.trainer.is_global_zero:
            return
        target = Path(self.export_dir) if self.export_dir else Path(log_dir) / "export"
        export_model(self.model, self.config, self.sparsity, target)
        logger.info("exported the final model to %s", target)

    # ------------------------------------------------------------------ optimizer

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError(
                "SLoPeModule schedules the learning rate over trainer.max_steps; set "
                "trainer.max_steps to a positive number of optimizer steps"
            )
        decay, no_decay = _decay_groups(self.model)
        logger.info(
            "AdamW: %d decayed tensors (%d values), %d not decayed (%d values)",
            len(decay),
            sum(p.numel() for p in decay),
            len(no_decay),
            sum(p.numel() for p in no_decay),
        )
        cfg = self.optim
        fused = cfg.fused
        if fused is None:
            fused = all(p.device.type == "cuda" for p in self.model.parameters())
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=fused or None,
        )
        warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total_steps
        warmup_steps = max(1, round(warmup))

        def multiplier(step: int) -> float:
            return lr_multiplier(step, warmup_steps, total_steps, cfg)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }


def _decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matrices decay; vectors (biases, norm gains) do not (nanoGPT's rule)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return decay, no_decay


def _validate_optimizer(cfg: OptimizerConfig) -> None:
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr must be positive, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.warmup < 0:
        raise ValueError(
            f"optimizer.warmup must be >= 0 (fraction < 1, or steps), got {cfg.warmup}"
        )
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"optimizer.betas must lie in [0, 1), got {cfg.betas}")
