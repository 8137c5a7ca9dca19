"""Lightning callbacks for SLoPe: the transposed-mask schedule, lazy adapters, token throughput.

They act through hooks only and work with any LightningModule whose model was sparsified with
:func:`slope_lightning.sparsify` (in the module's ``__init__``, so that the layers exist when
the trainer restores a checkpoint).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from typing_extensions import override

from slope_lightning.sparse import SparseLinear, restore_adapters, sparse_layers
from slope_lightning.sparse.adapters import AdapterInit

logger = logging.getLogger(__name__)

Schedule = int | Callable[[int], bool]


def _require_sparse_layers(pl_module: pl.LightningModule, who: str) -> list[SparseLinear]:
    layers = [layer for _, layer in sparse_layers(pl_module)]
    if not layers:
        raise RuntimeError(
            f"{who}: the LightningModule has no SparseLinear layer; call "
            "slope_lightning.sparsify(model) in the module's __init__"
        )
    return layers


class MaskScheduler(Callback):
    """Re-derive every layer's double-pruned transposed mask M_C on a schedule, and log it.

    While this callback is attached it owns the schedule: it switches the layers' automatic
    refresh off and refreshes M_C from the current W_R before the forward of every step that
    the schedule selects. Logged (on logging steps, under ``sparsity/``): ``wrc_kept_fraction``
    (nonzeros of W_RC over those of W_R), ``backward_dropped_fraction`` (its complement) and
    ``mc_flipped`` (entries of M_C that changed since the previous refresh, all layers).

    Args:
        every: refresh every this many optimizer steps (default 1, as the paper's accuracy
            runs), or a callable ``step -> bool`` that says whether to refresh at a step.

    Raises:
        ValueError: if ``every`` is neither a positive int nor a callable.

    Example:
        >>> trainer = pl.Trainer(callbacks=[MaskScheduler(every=100)])  # doctest: +SKIP
    """

    def __init__(self, every: Schedule = 1) -> None:
        if not callable(every) and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(
                f"MaskScheduler(every={every!r}): give a positive number of optimizer steps "
                "or a callable step -> bool"
            )
        self.every = every
        self.last_refresh_step = 0
        self.flipped_since_log = 0
        self.refreshes = 0

    def _due(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step > 0 and step - self.last_refresh_step >= self.every

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for layer in _require_sparse_layers(pl_module, "MaskScheduler"):
            layer.transpose_mask_interval = None  # this callback owns the schedule now

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_refresh_step or not self._due(step):
            return
        log_now = (step % max(1, trainer.log_every_n_steps)) == 0
        kept = total = flipped = 0
        for _, layer in sparse_layers(pl_module):
            refresh = layer.refresh_transpose_mask(with_stats=log_now)
            if refresh is not None:
                kept, total, flipped = (
                    kept + refresh.kept,
                    total + refresh.total,
                    flipped + refresh.flipped,
                )
        self.last_refresh_step = step
        self.refreshes += 1
        if log_now and total:
            pl_module.log_dict(
                {
                    "sparsity/wrc_kept_fraction": kept / total,
                    "sparsity/backward_dropped_fraction": 1.0 - kept / total,
                    "sparsity/mc_flipped": float(flipped),
                },
                on_step=True,
                on_epoch=False,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_refresh_step": self.last_refresh_step, "refreshes": self.refreshes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_refresh_step = int(state_dict["last_refresh_step"])
        self.refreshes = int(state_dict["refreshes"])


class LazyLoRA(Callback):
    """Switch SLoPe's low-rank adapters on late in training (the paper: the last 1%).

    At the start step, adds an adapter to every SparseLinear (Lᵀ kept N:M sparse, so the
    merged inference path stays exact), puts the new parameters into the running optimizer
    as a new param group and extends the LR scheduler to it. Under DDP, adapters start
    identical on every rank (seeded) and their gradients are averaged across ranks by this
    callback (DDP's reducer was built before they existed). A run resumed from a checkpoint
    taken after the start step gets its adapters back before the weights are loaded.

    Args:
        start: a float in (0, 1): fraction of ``trainer.max_steps`` (default 0.99); or an int:
            the optimizer step at which adapters are switched on.
        rank: adapter rank: an int, or a float in (0, 1) read as a fraction of the hidden
            size (0.0156 = the paper's 1.56%), as the paper reports ranks.
        hidden_size: the hidden size a fractional rank refers to; None: the module's
            ``config.d_model`` if it has one (SLoPeModule does), else each layer's d_in.
        init: "slope" (L ~ N(0, 1), R = 0, s = 1/r) or "peft" (Kaiming L, R = 0, s = alpha/r).
        alpha: scale numerator for ``init="peft"``.
        lr: learning rate of the adapter parameters (None: the first param group's).
        weight_decay: weight decay of the adapter parameters.
        seed: seed of L's initialisation (same on every rank).

    Raises:
        ValueError: on a bad ``start``, ``rank``, ``init`` or ``lr``, or when ``start`` is a
            fraction and the trainer has no ``max_steps``.
    """

    def __init__(
        self,
        start: float | int = 0.99,
        rank: float | int = 0.0156,
        hidden_size: int | None = None,
        init: AdapterInit = "slope",
        alpha: float | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise ValueError(f"LazyLoRA(start={start!r}): give a fraction in (0, 1) or a step")
        if isinstance(start, float) and not 0.0 <= start < 1.0:
            raise ValueError(
                f"LazyLoRA(start={start}): a fractional start must lie in [0, 1) "
                "(0.99 = the last 1% of max_steps)"
            )
        if isinstance(start, int) and start < 0:
            raise ValueError(f"LazyLoRA(start={start}): the start step must be >= 0")
        if isinstance(rank, bool) or not isinstance(rank, int | float) or rank <= 0:
            raise ValueError(f"LazyLoRA(rank={rank!r}): give a positive int or a fraction")
        if init not in ("slope", "peft"):
            raise ValueError(f"LazyLoRA(init={init!r}): choose 'slope' or 'peft'")
        if lr is not None and lr <= 0:
            raise ValueError(f"LazyLoRA(lr={lr}): the learning rate must be positive")
        self.start = start
        if hidden_size is not None and hidden_size < 1:
            raise ValueError(f"LazyLoRA(hidden_size={hidden_size}): give a positive width")
        self.rank = rank
        self.hidden_size = hidden_size
        self.init: AdapterInit = init
        self.alpha = alpha
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.active = False
        self.started_at: int | None = None
        self._needs_optimizer_group = False
        self._strict_loading = True

    def start_step(self, trainer: pl.Trainer) -> int:
        """The optimizer step at which adapters are switched on."""
        if isinstance(self.start, int):
            return self.start
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError(
                f"LazyLoRA(start={self.start}) is a fraction of trainer.max_steps, but max_steps "
                "is not set; set trainer.max_steps or give start as a step number"
            )
        return math.floor(self.start * trainer.max_steps)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _require_sparse_layers(pl_module, "LazyLoRA")
        self._strict_loading = pl_module.strict_loading
        if stage == "fit":
            # A checkpoint taken after the start holds adapter weights a fresh model lacks.
            # Lightning loads the model before callbacks see the checkpoint, so loading is
            # made lenient here and done again, strictly, in on_load_checkpoint.
            pl_module.strict_loading = False

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("state_dict", {})
        added = restore_adapters(pl_module, state)  # none if the module restored them itself
        pl_module.strict_loading = self._strict_loading
        pl_module.load_state_dict(state, strict=self._strict_loading)
        if any(layer.adapter is not None for _, layer in sparse_layers(pl_module)):
            self.active = True
            self._needs_optimizer_group = True
            logger.info("LazyLoRA: resumed with adapters on (%d restored here)", added)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.strict_loading = self._strict_loading
        self.start_step(trainer)  # validate early: a bad start fails before training
        if self._needs_optimizer_group:  # resumed after the start: optimizer state follows
            self._extend_optimizer(trainer, pl_module)
            self._needs_optimizer_group = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.active or trainer.global_step < self.start_step(trainer):
            return
        rank = self.resolved_rank(pl_module)
        for name, layer in sparse_layers(pl_module):
            # Seeded per layer by a stable hash, so every DDP rank draws the same L.
            generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            layer.add_adapter(rank, init=self.init, alpha=self.alpha, generator=generator)
        self._extend_optimizer(trainer, pl_module)
        self.active = True
        self.started_at = trainer.global_step
        logger.info("LazyLoRA: adapters switched on at step %d", trainer.global_step)

    def resolved_rank(self, pl_module: pl.LightningModule) -> int | float:
        """The rank to use: an int, or (no hidden size known) a fraction of each layer's d_in."""
        if isinstance(self.rank, int):
            return self.rank
        hidden = self.hidden_size or getattr(getattr(pl_module, "config", None), "d_model", None)
        return max(1, round(self.rank * hidden)) if hidden else self.rank

    def _adapter_parameters(self, pl_module: pl.LightningModule) -> list[torch.nn.Parameter]:
        params: list[torch.nn.Parameter] = []
        for _, layer in sparse_layers(pl_module):
            if layer.adapter is not None:
                params += [layer.adapter.down_values, layer.adapter.up]
        return params

    def _extend_optimizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise RuntimeError("LazyLoRA: the trainer has no optimizer to add adapters to")
        optimizer = trainer.optimizers[0]
        adapter_params = self._adapter_parameters(pl_module)
        # After a resume, configure_optimizers() may already have put the restored adapters
        # into its groups; they belong in their own group, as in the uninterrupted run.
        adapter_ids = {id(p) for p in adapter_params}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in adapter_ids]
        base_group = optimizer.param_groups[0]
        base_lr = base_group.get("initial_lr", base_group["lr"])
        lr = self.lr if self.lr is not None else base_lr
        # The new group joins the schedule where group 0 is now: same multiplier of its base.
        multiplier = base_group["lr"] / base_lr if base_lr > 0 else 1.0
        optimizer.add_param_group(
            {
                "params": adapter_params,
                "weight_decay": self.weight_decay,
                "lr": lr * multiplier,
                "initial_lr": lr,
            }
        )
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            scheduler.base_lrs.append(lr)
            if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: the new group follows group 0
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(lr * multiplier)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.active or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world == 1:
            return
        for param in self._adapter_parameters(pl_module):
            if param.grad is not None:
                dist.all_reduce(param.grad)  # a sync point, once per optimizer step
                param.grad.div_(world)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.active or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        adapters = [layer.adapter for _, layer in sparse_layers(pl_module) if layer.adapter]
        with torch.no_grad():
            down_norm = torch.linalg.vector_norm(
                torch.stack([a.down_values.float().norm() for a in adapters])
            )
            up_norm = torch.linalg.vector_norm(torch.stack([a.up.float().norm() for a in adapters]))
        pl_module.log_dict(
            {"adapters/L_norm": down_norm, "adapters/R_norm": up_norm},
            on_step=True,
            on_epoch=False,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "started_at": self.started_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started_at = state_dict.get("started_at")
        if state_dict.get("active") and not self.active:
            raise RuntimeError(
                "LazyLoRA: the checkpoint was taken with adapters on, but none were restored; "
                "sparsify the model in the LightningModule's __init__ so layers exist at setup"
            )


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for (input, target) token batches: logs tokens/s.

    Metrics: ``train/items_per_sec`` (tokens per second, all devices; multi-device runs),
    ``train/device/items_per_sec`` (per device), ``train/batches_per_sec``,
    ``train/samples_per_sec``.

    Args:
        window_size: batches averaged per rate; rates appear once this many have run.
    """

    def __init__(self, window_size: int = 5) -> None:
        super().__init__(
            batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size
        )


def _batch_size(batch: Any) -> int:
    return int(batch[0].shape[0])


def _batch_tokens(batch: Any) -> int:
    return int(batch[0].numel())
