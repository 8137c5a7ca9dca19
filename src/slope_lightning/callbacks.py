"""Lightning callbacks for SLoPe: the transposed-mask schedule, lazy adapters, token throughput.

They act through hooks only and work with any LightningModule whose model was sparsified with
:func:`slope_lightning.sparsify` (in the module's ``__init__`` or ``configure_model``). On a
module without sparse layers (the dense baseline under the same config) they say once that
they are idle and do nothing. Console messages come from global rank 0 only.
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
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from slope_lightning.optim import add_param_group_following_schedule, check_schedule_extendable
from slope_lightning.sparse import SparseLinear, sparse_layers
from slope_lightning.sparse.adapters import AdapterInit, resolve_rank

logger = logging.getLogger(__name__)

Schedule = int | Callable[[int], bool]


@rank_zero_only
def _info(message: str, *args: object) -> None:
    logger.info(message, *args)


def _log_interval(trainer: pl.Trainer) -> int:
    """The trainer's logging interval in steps (Lightning sets ``log_every_n_steps`` at init
    without declaring it on the class); metrics follow it."""
    return max(1, int(getattr(trainer, "log_every_n_steps", 1)))


def _sparse_layers_or_idle(
    pl_module: pl.LightningModule, who: str
) -> list[tuple[str, SparseLinear]]:
    """The module's SparseLinear layers by name; if there are none, say that ``who`` is idle."""
    layers = sparse_layers(pl_module)
    if not layers:
        rank_zero_warn(
            f"{who} is idle: the LightningModule has no SparseLinear layer (a dense baseline, "
            "e.g. model.sparsity.sparse: false). To train with SLoPe, call "
            "slope_lightning.sparsify(model) in the module's __init__ or configure_model."
        )
    return layers


class MaskScheduler(Callback):
    """Re-derive every layer's double-pruned transposed mask M_C on a schedule, and log it.

    While this callback is attached it owns the schedule: when training starts it switches the
    layers' automatic refresh off, then refreshes M_C from the current W_R before the forward
    of every step that the schedule selects. Logged (on logging steps, under ``sparsity/``):
    ``wrc_kept_fraction`` (nonzeros of W_RC over those of W_R), ``backward_dropped_fraction``
    (its complement) and ``mc_flipped`` (entries of M_C that changed since the previous
    refresh, all layers). Idle, with one warning, on a module without sparse layers.

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
        self.refreshes = 0
        self.idle = False

    def _due(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step > 0 and step - self.last_refresh_step >= self.every

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, so a model sparsified there is seen too.
        layers = _sparse_layers_or_idle(pl_module, "MaskScheduler")
        self.idle = not layers
        for _, layer in layers:
            layer.transpose_mask_interval = None  # this callback owns the schedule now

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.idle or step == self.last_refresh_step or not self._due(step):
            return
        log_now = step % _log_interval(trainer) == 0
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
    merged inference path stays exact) and puts the new parameters into the running optimizer
    as a param group named ``"adapters"`` that follows the LR schedule (see
    :func:`~slope_lightning.optim.add_param_group_following_schedule` for the rule and the
    supported schedulers). Under DDP, adapters start identical on every rank (seeded) and
    their gradients are averaged across ranks by this callback (DDP's reducer was built before
    they existed).

    Everything that can only fail late is checked when training starts: the start step
    against ``max_steps``, the rank against every layer's size, and whether the scheduler can
    be extended. On a module without sparse layers the callback is idle (one warning).

    **Resume.** Adapters come back with the weights, for any LightningModule and any load
    path: a SparseLinear whose incoming state dict holds adapter weights attaches an
    adapter of that rank before loading them, so a checkpoint taken after the start loads
    strictly, once, in fit, validate and test alike. A resumed fit then puts the restored
    adapters back into their own group before the optimizer state loads.

    Args:
        start: an int: the optimizer step at which adapters are switched on; or a float in
            [0, 1): that fraction of ``trainer.max_steps`` (default 0.99).
        rank: adapter rank: an int (an integer in YAML, ``rank: 4``, is an int), or a float
            in (0, 1) read as a fraction of the hidden size (0.0156 = the paper's 1.56%).
        hidden_size: the hidden size a fractional rank refers to; None: the module's
            ``config.d_model`` if it has one (SLoPeModule does), else each layer's d_in.
        init: "slope" (L ~ N(0, 1), R = 0, s = 1/r) or "peft" (Kaiming L, R = 0, s = alpha/r).
        alpha: scale numerator for ``init="peft"``.
        lr: base learning rate of the adapters' group, scaled by the schedule like the other
            groups' (None: the first param group's base lr).
        weight_decay: weight decay of the adapter parameters.
        seed: seed of L's initialisation (same on every rank).

    Raises:
        ValueError: on a bad ``start``, ``rank`` (a float >= 1 included: give an int),
            ``hidden_size``, ``init`` or ``lr``; and, when training starts, a fractional
            ``start`` without ``trainer.max_steps``, a start at or after ``max_steps``, a rank
            too large for some layer, or a scheduler the adapters' group cannot follow.
        RuntimeError: when training starts, a checkpoint taken after the start whose adapters
            were not restored, or a model that already has adapters.

    Example:
        >>> trainer = pl.Trainer(max_steps=10_000, callbacks=[LazyLoRA(start=0.99, rank=0.0156)])
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        start: int | float = 0.99,
        rank: int | float = 0.0156,
        hidden_size: int | None = None,
        init: AdapterInit = "slope",
        alpha: float | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        # int before float in the annotations: LightningCLI then reads YAML `4` as the int 4.
        if isinstance(start, bool) or not isinstance(start, int | float):
            raise ValueError(f"LazyLoRA(start={start!r}): give a fraction in [0, 1) or a step")
        if isinstance(start, float) and not 0.0 <= start < 1.0:
            raise ValueError(
                f"LazyLoRA(start={start}): a fractional start must lie in [0, 1) "
                "(0.99 = the last 1% of max_steps); give an int for a step number"
            )
        if isinstance(start, int) and start < 0:
            raise ValueError(f"LazyLoRA(start={start}): the start step must be >= 0")
        if isinstance(rank, bool) or not isinstance(rank, int | float) or rank <= 0:
            raise ValueError(
                f"LazyLoRA(rank={rank!r}): give a positive int or a fraction in (0, 1)"
            )
        if isinstance(rank, float) and rank >= 1.0:
            raise ValueError(
                f"LazyLoRA(rank={rank}): a float rank is a fraction of the hidden size and "
                f"must lie in (0, 1); for an absolute rank give an int (rank={int(rank)})"
            )
        if hidden_size is not None and (isinstance(hidden_size, bool) or hidden_size < 1):
            raise ValueError(f"LazyLoRA(hidden_size={hidden_size}): give a positive width")
        if init not in ("slope", "peft"):
            raise ValueError(f"LazyLoRA(init={init!r}): choose 'slope' or 'peft'")
        if lr is not None and lr <= 0:
            raise ValueError(f"LazyLoRA(lr={lr}): the learning rate must be positive")
        if weight_decay < 0:
            raise ValueError(f"LazyLoRA(weight_decay={weight_decay}): must be >= 0")
        self.start = start
        self.rank = rank
        self.hidden_size = hidden_size
        self.init: AdapterInit = init
        self.alpha = alpha
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.active = False
        self.started_at: int | None = None
        self.idle = False
        self._resumed_active = False

    def start_step(self, trainer: pl.Trainer) -> int:
        """The optimizer step at which adapters are switched on.

        Raises:
            ValueError: ``start`` is a fraction and the trainer has no ``max_steps``.
        """
        if isinstance(self.start, int):
            return self.start
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError(
                f"LazyLoRA(start={self.start}) is a fraction of trainer.max_steps, but max_steps "
                "is not set; set trainer.max_steps or give start as a step number"
            )
        return math.floor(self.start * trainer.max_steps)

    def resolved_rank(self, pl_module: pl.LightningModule) -> int | float:
        """The rank to use: an int, or (no hidden size known) a fraction of each layer's d_in."""
        if isinstance(self.rank, int):
            return self.rank
        hidden = self.hidden_size or getattr(getattr(pl_module, "config", None), "d_model", None)
        return max(1, round(self.rank * hidden)) if hidden else self.rank

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before Lightning restores a checkpoint (in every stage).
        self._resumed_active = False  # set by load_state_dict if a checkpoint follows

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, the checkpoint's model and callback state, and
        # configure_optimizers; before the optimizer state loads and before the first step.
        layers = _sparse_layers_or_idle(pl_module, "LazyLoRA")
        self.idle = not layers
        if self.idle:
            return
        with_adapters = sum(layer.adapter is not None for _, layer in layers)
        if self._resumed_active:
            if with_adapters == 0:
                raise RuntimeError(
                    "LazyLoRA: the checkpoint was taken with adapters on, but the model has "
                    "none; sparsify the model in the LightningModule's __init__ (or "
                    "configure_model) so its layers exist when the checkpoint loads"
                )
            self.active = True
            self._add_optimizer_group(trainer, pl_module)  # the optimizer state follows
            _info("LazyLoRA: resumed with adapters on (switched on at step %s)", self.started_at)
            return
        if with_adapters:
            raise RuntimeError(
                f"LazyLoRA: {with_adapters} layer(s) already have an adapter before training; "
                "LazyLoRA adds adapters itself at its start step: remove the add_adapters() "
                "call or the callback"
            )
        self._validate_before_training(trainer, pl_module, layers)

    def _validate_before_training(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: list[tuple[str, SparseLinear]],
    ) -> None:
        """Fail now, not at the start step (which may be 99% into the run)."""
        start = self.start_step(trainer)
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps > 0 and start >= max_steps:
            raise ValueError(
                f"LazyLoRA(start={self.start}) switches adapters on at step {start}, but "
                f"trainer.max_steps={max_steps}, so they would never train; give a start "
                f"below {max_steps} (or a fraction of max_steps in [0, 1))"
            )
        rank = self.resolved_rank(pl_module)
        for name, layer in layers:
            resolve_rank(
                rank,
                layer.in_features,
                layer.out_features,
                f"LazyLoRA(rank={self.rank}) on layer {name!r}",
            )
        if not trainer.optimizers:
            raise RuntimeError("LazyLoRA: the trainer has no optimizer to add adapters to")
        try:
            check_schedule_extendable(
                trainer.optimizers[0], [c.scheduler for c in trainer.lr_scheduler_configs]
            )
        except ValueError as error:
            raise ValueError(
                f"LazyLoRA(start={self.start}) cannot add the adapters to this run's "
                f"optimizer at step {start}: {error}"
            ) from None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.idle or self.active or trainer.global_step < self.start_step(trainer):
            return
        rank = self.resolved_rank(pl_module)
        for name, layer in sparse_layers(pl_module):
            # Seeded per layer by a stable hash, so every DDP rank draws the same L.
            generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            layer.add_adapter(rank, init=self.init, alpha=self.alpha, generator=generator)
        self._add_optimizer_group(trainer, pl_module)
        self.active = True
        self.started_at = trainer.global_step
        _info("LazyLoRA: adapters switched on at step %d", trainer.global_step)

    def _adapter_parameters(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        return [
            param
            for _, layer in sparse_layers(pl_module)
            if layer.adapter is not None
            for param in layer.adapter.parameters()
        ]

    def _add_optimizer_group(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise RuntimeError("LazyLoRA: the trainer has no optimizer to add adapters to")
        add_param_group_following_schedule(
            trainer.optimizers[0],
            [config.scheduler for config in trainer.lr_scheduler_configs],
            self._adapter_parameters(pl_module),
            name="adapters",
            lr=self.lr,
            weight_decay=self.weight_decay,
        )

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
        if not self.active or trainer.global_step % _log_interval(trainer):
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
        # Runs after the module's weights (and, through the pre-hook, its adapters) loaded;
        # on_fit_start checks that they are there and extends the optimizer.
        self.started_at = state_dict.get("started_at")
        self._resumed_active = bool(state_dict.get("active"))


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
