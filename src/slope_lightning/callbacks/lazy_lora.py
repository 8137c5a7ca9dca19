"""LazyLoRA: switch SLoPe's low-rank adapters on late in training (the paper: the last 1%)."""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import override

from slope_lightning.callbacks.lightning_internals import reload_checkpoint
from slope_lightning.callbacks.shared import (
    LoggingStepCallback,
    info,
    run_length,
    sparse_layers_after_conversion,
)
from slope_lightning.optim import (
    ADAPTER_GROUP,
    check_adapter_placement,
    param_group_named,
    place_adapter_params,
    put_back_group,
    set_aside_empty_group,
)
from slope_lightning.sparse import SparseLinear, sparse_layers
from slope_lightning.sparse.adapters import AdapterInit, resolve_rank
from slope_lightning.sparse.dtensor import full_tensor, is_dtensor

logger = logging.getLogger(__name__)

#: Attributes of a model config that hold the hidden size: Hugging Face (LLaMA, Mistral,
#: Qwen2, OPT, BERT: ``hidden_size``; GPT-2: ``n_embd``), litgpt (``n_embd``), ours and
#: BART/T5 (``d_model``).
HIDDEN_SIZE_ATTRIBUTES: tuple[str, ...] = ("hidden_size", "n_embd", "d_model")


def hidden_size_of(module: nn.Module) -> tuple[int, str] | None:
    """The hidden size of the model inside ``module`` and where it was read, or None.

    Read from the first ``config`` attribute (the module's own, else a submodule's, in
    ``named_modules()`` order) with one of :data:`HIDDEN_SIZE_ATTRIBUTES`; without one, the
    most common d_in among the SparseLinear layers (in a transformer block every projection
    but the MLP's down projection reads the hidden size). None without either.
    """
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if config is None:
            continue
        for attribute in HIDDEN_SIZE_ATTRIBUTES:
            value = getattr(config, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                where = f"{name}.config" if name else "config"
                return value, f"{where}.{attribute}"
    layers = sparse_layers(module)
    if not layers:
        return None
    counts = Counter(layer.in_features for _, layer in layers)
    width, count = counts.most_common(1)[0]
    return width, f"the most common d_in ({count} of {len(layers)} sparse layers)"


class LazyLoRA(LoggingStepCallback):
    """Switch SLoPe's low-rank adapters on late in training (the paper: the last 1%).

    At the start step, adds an adapter to every SparseLinear (Lᵀ kept N:M sparse, so the
    merged inference path stays exact) and puts the new parameters into the running optimizer's
    param group named ``"adapters"``: the empty one that
    :func:`~slope_lightning.optim.adapter_param_group` declared in ``configure_optimizers``
    (any torch scheduler, SequentialLR and ReduceLROnPlateau included: it has scheduled that
    group from the first step), else a new group that follows the LR schedule (see
    :func:`~slope_lightning.optim.add_param_group_following_schedule` for the rule and the
    supported schedulers). Under DDP, adapters start identical on every rank (seeded) and
    their gradients are averaged across ranks by this callback (DDP's reducer was built before
    they existed). Under FSDP2 they are sharded by rows like the layer's values (each rank
    keeps its rows of the same seeded draw), gathered for each forward and their gradients
    reduce-scattered, as FSDP2 does its own parameters.

    Everything that can only fail late is checked before the first step: the rank against
    every layer's size and whether the scheduler can be extended (``on_fit_start``), the start
    step against the run's length (``on_train_start``). On a module without sparse layers
    the callback is idle (one warning).

    **Run length.** A fractional ``start`` is a fraction of the run's optimizer steps,
    ``trainer.estimated_stepping_batches``: ``max_steps``, or for a ``max_epochs`` run the
    epochs times the optimizer steps per epoch, whichever ends the run first. It is read when
    training starts (``on_train_start``, once the training data is set up).

    **Rank.** A fractional ``rank`` is a fraction of the model's hidden size, one rank for
    every layer (the paper's 1.56% is ``rank=0.0156``): ``hidden_size`` if given, else the
    ``hidden_size`` / ``n_embd`` / ``d_model`` of the first ``config`` found on the module or
    its submodules (SLoPeModule, Hugging Face and litgpt models), else the most common d_in
    among the sparse layers (see :func:`hidden_size_of`). The resolved rank and its source
    are logged when training starts.

    **Learning rate.** With a declared ``"adapters"`` group, that group's settings are used
    (``lr`` and a non-zero ``weight_decay``, if given, must equal them: checked at fit start).
    Otherwise ``lr`` is the adapters' *base* (peak) learning rate, like the
    optimizer's own ``lr``: the group follows the schedule as if it had been there from step
    0 (the rule of :func:`~slope_lightning.optim.add_param_group_following_schedule`), so at
    every step its learning rate is ``lr`` times the factor the schedule applies to param
    group 0 at that step. Joining at 99% of a cosine schedule that decays to 10% of the
    peak, the adapters start near ``0.1 * lr``. To have them start at a learning rate x,
    give ``lr = x / factor``. The base and the actual learning rate are logged at the start.

    **Resume.** Adapters come back with the weights, for any LightningModule and any load
    path: a SparseLinear whose incoming state dict holds adapter weights attaches an
    adapter of that rank before loading them, so a checkpoint taken after the start loads
    strictly, once, in fit, validate and test alike. A resumed fit then puts the restored
    adapters back into their own group before the optimizer state loads.

    Args:
        start: an int: the optimizer step at which adapters are switched on; or a float in
            [0, 1): that fraction of the run's optimizer steps (default 0.99; see **Run
            length** above).
        rank: adapter rank: an int (an integer in YAML, ``rank: 4``, is an int), or a float
            in (0, 1) read as a fraction of the hidden size (0.0156 = the paper's 1.56%).
        hidden_size: the hidden size a fractional rank refers to; None: read from the
            model (see **Rank** above).
        init: "slope" (L ~ N(0, 1), R = 0, s = 1/r) or "peft" (Kaiming L, R = 0, s = alpha/r).
        alpha: scale numerator for ``init="peft"``.
        lr: base (peak) learning rate of the adapters' group, scaled by the schedule's
            current factor like the other groups' (see **Learning rate** above; None: the
            first param group's base lr, so the adapters' lr equals group 0's at every step).
        weight_decay: weight decay of the adapter parameters.
        seed: seed of L's initialisation (same on every rank).

    Raises:
        ValueError: on a bad ``start``, ``rank`` (a float >= 1 included: give an int),
            ``hidden_size``, ``init`` or ``lr``; and, when training starts, a fractional
            ``start`` in a run of unknown length (no ``max_steps``, ``max_epochs=-1`` or an
            iterable without length), a start at or after the run's last step, a rank too
            large for some layer, or a scheduler the adapters' group cannot follow.
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
        self._total_steps: int | None = None  # the run's optimizer steps, read at train start
        self._rank: int | None = None  # the resolved rank, read at fit start
        self._set_aside: tuple[int, dict[str, Any]] | None = None  # see on_fit_start

    def total_steps(self, trainer: pl.Trainer) -> int:
        """The run's optimizer steps (``trainer.estimated_stepping_batches``), once per run.

        Raises:
            ValueError: the run's length is unknown (infinite or of unknown size).
        """
        if self._total_steps is None:
            self._total_steps = run_length(
                trainer,
                f"LazyLoRA(start={self.start})",
                "set trainer.max_steps or give start as a step number",
            )
        return self._total_steps

    def start_step(self, trainer: pl.Trainer) -> int:
        """The optimizer step at which adapters are switched on.

        Raises:
            ValueError: ``start`` is a fraction and the run's length is unknown.
        """
        if isinstance(self.start, int):
            return self.start
        return math.floor(self.start * self.total_steps(trainer))

    def resolved_rank(self, pl_module: pl.LightningModule) -> int | float:
        """The adapter rank of every layer: an int, the fraction of the hidden size (see
        **Rank** in the class docstring), or the fraction itself when no hidden size can be
        found (a module without sparse layers)."""
        if isinstance(self.rank, int):
            return self.rank
        if self._rank is not None:
            return self._rank
        if self.hidden_size is not None:
            return max(1, round(self.rank * self.hidden_size))
        found = hidden_size_of(pl_module)
        return max(1, round(self.rank * found[0])) if found is not None else self.rank

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before Lightning restores a checkpoint (in every stage).
        self._resumed_active = False  # set by load_state_dict if a checkpoint follows
        self._total_steps = None  # this run's length, read at train start
        self._rank = None
        self._set_aside = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, the checkpoint's model and callback state, and
        # configure_optimizers; before the optimizer state loads and before the first step.
        layers = sparse_layers_after_conversion(trainer, pl_module, "LazyLoRA")
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
            info(
                logger,
                "LazyLoRA: resumed with adapters on (switched on at step %s)",
                self.started_at,
            )
            return
        if with_adapters:
            raise RuntimeError(
                f"LazyLoRA: {with_adapters} layer(s) already have an adapter before training; "
                "LazyLoRA adds adapters itself at its start step: remove the add_adapters() "
                "call or the callback"
            )
        self._validate_before_training(trainer, pl_module, layers)
        if trainer.strategy.restore_checkpoint_after_setup:
            # FSDP2: a checkpoint may load next, and torch's loader refuses an empty declared
            # group when the checkpoint's holds adapters; it is put back at train start.
            self._set_aside = set_aside_empty_group(trainer.optimizers[0], ADAPTER_GROUP)

    def _validate_before_training(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: list[tuple[str, SparseLinear]],
    ) -> None:
        """Fail now, not at the start step (which may be 99% into the run)."""
        rank = self.resolved_rank(pl_module)
        if isinstance(self.rank, float) and isinstance(rank, int):
            self._rank = rank  # one rank for every layer, fixed for the run
            found = (
                (self.hidden_size, "LazyLoRA(hidden_size=...)")
                if self.hidden_size is not None
                else hidden_size_of(pl_module)
            )
            if found is not None:
                info(
                    logger,
                    "LazyLoRA: rank %d = %.4g x hidden size %d (from %s), for every layer",
                    rank,
                    self.rank,
                    found[0],
                    found[1],
                )
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
            check_adapter_placement(
                trainer.optimizers[0],
                [c.scheduler for c in trainer.lr_scheduler_configs],
                lr=self.lr,
                weight_decay=self.weight_decay or None,  # 0, the default: the group's own
            )
        except ValueError as error:
            raise ValueError(
                f"LazyLoRA(start={self.start}) cannot add the adapters to this run's "
                f"optimizer: {error}"
            ) from None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After the training data is set up (a max_epochs run's length is known) and before
        # the first step; a run resumed with adapters on has nothing left to check.
        if self._set_aside is not None:
            put_back_group(trainer.optimizers[0], self._set_aside)
            self._set_aside = None
            if trainer.ckpt_path is not None and not self._resumed_active:
                self._reload_checkpoint(trainer, pl_module)  # the group's scheduled settings
        if self.idle or self.active:
            return
        start = self.start_step(trainer)
        total = self.total_steps(trainer)
        if start >= total:
            raise ValueError(
                f"LazyLoRA(start={self.start}) switches adapters on at step {start}, but the "
                f"run ends after {total} optimizer steps (max_steps={trainer.max_steps}, "
                f"max_epochs={trainer.max_epochs}), so they would never train; give a start "
                f"below {total} (or a fraction of the run in [0, 1))"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._resumed_active and not self.active and not self.idle:
            # A strategy that restores a checkpoint after on_fit_start (ModelParallelStrategy,
            # i.e. FSDP2) loaded the weights and optimizer state before the adapters existed,
            # so their entries were skipped. Complete the structure the checkpoint was saved
            # with (adapters, their param group; the schedule's restored state kept), then
            # load the checkpoint again into it: a collective, every rank runs it, once.
            self._add_adapters(pl_module)  # placeholder values, overwritten by the load
            schedules = [config.scheduler for config in trainer.lr_scheduler_configs]
            restored = [copy.deepcopy(schedule.state_dict()) for schedule in schedules]
            self._add_optimizer_group(trainer, pl_module)
            for schedule, state in zip(schedules, restored, strict=True):
                schedule.load_state_dict(state)  # the checkpoint's base lrs, one lambda more
            self._reload_checkpoint(trainer, pl_module)
            self.active = True
            info(
                logger,
                "LazyLoRA: resumed with adapters on (switched on at step %s)",
                self.started_at,
            )
            return
        if self.idle or self.active or trainer.global_step < self.start_step(trainer):
            return
        self._add_adapters(pl_module)
        self._add_optimizer_group(trainer, pl_module)
        self.active = True
        self.started_at = trainer.global_step
        info(logger, "LazyLoRA: adapters switched on at step %d", trainer.global_step)

    def _add_adapters(self, pl_module: pl.LightningModule) -> None:
        """An adapter on every sparse layer that has none, seeded per layer by a stable hash
        of its name, so every DDP rank draws the same L."""
        rank = self.resolved_rank(pl_module)
        for name, layer in sparse_layers(pl_module):
            if layer.adapter is None:
                generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
                layer.add_adapter(rank, init=self.init, alpha=self.alpha, generator=generator)

    def _reload_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Load the run's checkpoint again, weights and optimizer state, into the optimizer's
        complete structure (a collective: every rank runs it)."""
        # No trained weight has changed since the first load, but state a callback updates
        # between steps may have (an M_C refreshed at this step by a callback that ran
        # first): buffers and frozen parameters keep their current values.
        kept = [
            (tensor, tensor.detach().clone())
            for tensor in [*pl_module.buffers(), *pl_module.parameters()]
            if not tensor.requires_grad
        ]
        reload_checkpoint(trainer)  # optimizer state cleared, rebuilt by the load
        with torch.no_grad():
            for tensor, value in kept:
                tensor.copy_(value)

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
        declared = param_group_named(trainer.optimizers[0], ADAPTER_GROUP) is not None
        group = place_adapter_params(
            trainer.optimizers[0],
            [config.scheduler for config in trainer.lr_scheduler_configs],
            self._adapter_parameters(pl_module),
            name=ADAPTER_GROUP,
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
        base, now = float(group.get("initial_lr", group["lr"])), float(group["lr"])
        info(
            logger,
            "LazyLoRA: param group 'adapters' at step %d: base lr %.4g (%s) x the schedule's "
            "factor %.4g now = lr %.4g",
            trainer.global_step,
            base,
            "declared in configure_optimizers"
            if declared
            else "LazyLoRA(lr)"
            if self.lr is not None
            else "group 0's base lr",
            now / base,
            now,
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
            # Sharded adapters (FSDP2) had theirs reduce-scattered in the backward already.
            if param.grad is not None and not is_dtensor(param.grad):
                dist.all_reduce(param.grad)  # a sync point, once per optimizer step
                param.grad.div_(world)

    @override
    def on_logging_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        adapters = [layer.adapter for _, layer in sparse_layers(pl_module) if layer.adapter]
        with torch.no_grad():  # a sharded adapter's norm is over every rank's rows
            down_norm = torch.linalg.vector_norm(
                torch.stack([full_tensor(a.down_values.float().norm()) for a in adapters])
            )
            up_norm = torch.linalg.vector_norm(
                torch.stack([full_tensor(a.up.float().norm()) for a in adapters])
            )
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
