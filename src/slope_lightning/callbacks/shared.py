"""What the callbacks share, and the explicit types through which they coordinate.

No callback file imports another: each imports this module (and the layers below the
callbacks). The three rules that tie callbacks together are written here, once:

1. **One training method per run.** Every callback that is a 2:4 training method (SLoPe,
   SRSTE, TransposableSparse, OneShotPrune) derives from :class:`TrainingMethod`; a method
   refuses to train beside another (:meth:`TrainingMethod.refuse_other_methods`).
2. **Convert the model before others look at it.** A callback that reads the module's
   sparse layers when fitting starts (MaskScheduler, LazyLoRA) calls
   :func:`sparse_layers_after_conversion`, which lets every training method of the trainer
   convert the module first (:meth:`TrainingMethod.ensure_converted`), whatever the order of
   the callback list.
3. **Who owns the M_C schedule.** A callback derived from :class:`MaskScheduleOwner`
   (MaskScheduler) owns when the transposed mask M_C is re-derived; while one is attached,
   nothing else counts optimizer steps for the layers (:func:`mask_schedule_owned`).

Beside them: the pieces the baseline methods share (:class:`BaselineMethod`,
:class:`ConvertedAtStart`), the base of the callbacks that act on logging steps
(:class:`LoggingStepCallback`), the finite checks of the fault callbacks, and small helpers
(rank-zero logging, the logging interval, argument checks).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from slope_lightning.baselines.layers import replace_with_linear
from slope_lightning.baselines.oneshot import FixedMaskLinear
from slope_lightning.baselines.srste import SRSTELinear
from slope_lightning.baselines.transposable import TransposableSparseLinear
from slope_lightning.sparse import (
    LayerRules,
    SparseLinear,
    SparsifyReport,
    local_part,
    plan_layers,
    sparse_layers,
)
from slope_lightning.sparse.masks import check_nm

#: A schedule argument: every this many optimizer steps, or a callable ``step -> bool``.
Schedule = int | Callable[[int], bool]

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


@rank_zero_only
def info(log: logging.Logger, message: str, *args: object) -> None:
    """``log.info(message, *args)`` on global rank 0 only (console messages of callbacks)."""
    log.info(message, *args)


def log_interval(trainer: pl.Trainer) -> int:
    """The trainer's logging interval in steps (Lightning sets ``log_every_n_steps`` at init
    without declaring it on the class); metrics follow it."""
    return max(1, int(getattr(trainer, "log_every_n_steps", 1)))


class LoggingStepCallback(Callback):
    """Base of a callback that acts once at the end of each logging step: the end of the
    training batch after which ``trainer.global_step`` is a multiple of ``log_every_n_steps``
    (step 0 included), when Lightning writes the step's metrics.

    :meth:`on_logging_step` runs once per such step: the micro-batches of gradient
    accumulation that end at the same global step do not run it again, and it never runs
    when ``log_every_n_steps`` is 0 (Lightning never logs then). A subclass that overrides
    ``on_train_start`` calls this class's, which starts the count afresh for a new fit.
    """

    _last_logging_step: int = -1  # the global step whose end last ran on_logging_step

    def on_logging_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at the end of each logging step (see the class docstring)."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_logging_step = -1

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        interval = int(getattr(trainer, "log_every_n_steps", 1))  # 0: Lightning never logs
        if not interval or step % interval or step == self._last_logging_step:
            return  # not the end of a logging step (or its end was seen already)
        self._last_logging_step = step
        self.on_logging_step(trainer, pl_module)


def check_patterns(value: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    """``value`` as a tuple of fnmatch patterns (None stays None); ``where`` opens the
    message, e.g. ``"SRSTE(include"``.

    Raises:
        ValueError: ``value`` is a single string or holds something other than strings.
    """
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ValueError(
            f"{where}={value!r}): give a list of fnmatch patterns of layer names, "
            "e.g. ['*.mlp.*'], or null"
        )
    return tuple(value)


def check_nm_pattern(owner: str, n: int, m: int) -> None:
    """Raises a ValueError naming ``owner``'s n and m if N:M is not a valid pattern."""
    try:
        check_nm(n, m)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{owner}(n={n!r}, m={m!r}): {error}") from None


def check_fraction(owner: str, name: str, value: float, closed_above: bool) -> None:
    """Raises a ValueError unless ``value`` is a number in [0, 1] (or [0, 1))."""
    upper = "1]" if closed_above else "1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
        or (value == 1 and not closed_above)
    ):
        raise ValueError(f"{owner}({name}={value!r}): give a fraction of the run in [0, {upper}")


def check_count(owner: str, name: str, value: int, what: str) -> None:
    """Raises a ValueError unless ``value`` is a positive int (``what`` counts it in the
    message, e.g. ``"batches"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}({name}={value!r}): give a positive number of {what}")


def run_length(trainer: pl.Trainer, setting: str, fix: str = "set trainer.max_steps") -> int:
    """The run's optimizer steps: ``trainer.estimated_stepping_batches`` (max_steps, or the
    steps of max_epochs when they end the run first), for a ``setting`` that is a fraction
    of the run (named in the message, e.g. ``"LazyLoRA(start=0.5)"``).

    Raises:
        ValueError: the run's length is unknown (no max_steps and an infinite or unsized
            dataloader); the message ends with ``fix``.
    """
    estimate = trainer.estimated_stepping_batches
    if not math.isfinite(estimate) or estimate < 1:
        raise ValueError(
            f"{setting} is a fraction of the run's optimizer steps, but the run has no known "
            f"length (max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}, or a "
            f"dataloader without a length); {fix}"
        )
    return int(estimate)


def round_half_up(value: float) -> int:
    """``value`` rounded to the nearest integer, halves up (Python's round() goes to even)."""
    return math.floor(value + 0.5)


# --------------------------------------------------------------------------------------------
# The coordination types
# --------------------------------------------------------------------------------------------


class TrainingMethod(Callback):
    """Base of every callback that is a 2:4 training method; one of them per run.

    A method may convert the module's layers when fitting starts; callbacks that look at
    the layers then ask it to do so first (:meth:`ensure_converted`, called through
    :func:`sparse_layers_after_conversion`).
    """

    @property
    def label(self) -> str:
        """The callback's name in messages."""
        return type(self).__name__

    def refuse_other_methods(self, trainer: pl.Trainer) -> None:
        """Refuse a second training method among the trainer's callbacks.

        Raises:
            ValueError: the trainer has another :class:`TrainingMethod` callback.
        """
        others = [
            type(callback).__name__
            for callback in getattr(trainer, "callbacks", [])  # set on the trainer at init
            if callback is not self and isinstance(callback, TrainingMethod)
        ]
        if others:
            raise ValueError(
                f"{self.label} cannot train beside {others[0]}: each is a different 2:4 "
                "training method; keep one of them in trainer.callbacks"
            )

    def plan(self, module: nn.Module) -> SparsifyReport:
        """The layer-selection plan of this method for ``module`` as it is now (built by
        :func:`~slope_lightning.sparse.plan_layers`, nothing swapped): every linear layer,
        with what the method would do with it and why.

        Raises:
            ValueError: a layer named by ``include`` that the method cannot convert.
        """
        raise NotImplementedError(f"{self.label} defines no layer-selection plan")

    def ensure_converted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert the module now if this method converts it at fit start and has not yet
        (idempotent). The default converts nothing: the method converts in its own hooks."""


def training_methods(trainer: pl.Trainer) -> list[TrainingMethod]:
    """The trainer's training-method callbacks (at most one in a run that started)."""
    return [c for c in getattr(trainer, "callbacks", []) if isinstance(c, TrainingMethod)]


def sparse_layers_after_conversion(
    trainer: pl.Trainer, pl_module: pl.LightningModule, who: str
) -> list[tuple[str, SparseLinear]]:
    """The module's SparseLinear layers by name, once every training method of the trainer
    has converted the module (whatever the order of the callback list); if there are none,
    say that ``who`` is idle."""
    for method in training_methods(trainer):
        method.ensure_converted(trainer, pl_module)
    layers = sparse_layers(pl_module)
    if not layers:
        rank_zero_warn(
            f"{who} is idle: the LightningModule has no SparseLinear layer (a dense baseline, "
            "e.g. model.sparsity.sparse: false). To train with SLoPe, add the SLoPe callback, "
            "or call slope_lightning.sparsify(model) in the module's __init__ or "
            "configure_model."
        )
    return layers


class MaskScheduleOwner(Callback):
    """Base of a callback that owns when the layers' transposed mask M_C is re-derived.

    While one is attached, the layers' own step-counted refresh is off and no other callback
    reports optimizer steps to them (:func:`mask_schedule_owned`).
    """


def mask_schedule_owned(trainer: pl.Trainer) -> bool:
    """Whether a :class:`MaskScheduleOwner` among the trainer's callbacks owns the M_C
    schedule."""
    return any(isinstance(c, MaskScheduleOwner) for c in getattr(trainer, "callbacks", []))


# --------------------------------------------------------------------------------------------
# The baseline methods' common part
# --------------------------------------------------------------------------------------------

#: The layer types of the 2:4 training methods; a module holds those of one method at most.
METHOD_LAYERS: tuple[type[nn.Module], ...] = (
    SparseLinear,
    SRSTELinear,
    TransposableSparseLinear,
    FixedMaskLinear,
)

#: Strategies that shard parameters, whose layers the baseline methods cannot swap.
SHARDING_STRATEGIES: tuple[type, ...] = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


class BaselineMethod(TrainingMethod):
    """What the three baseline methods share: the layer selection (the plan of the
    baseline's :meth:`rules`), the checks before converting, the run's length, and the final
    swap back to ``nn.Linear``.

    Args:
        include: fnmatch patterns of layer names to convert (None: every candidate).
        exclude: patterns left dense (None: LM heads and embeddings,
            :data:`~slope_lightning.sparse.DEFAULT_EXCLUDE`).
    """

    #: The layer type this method trains with.
    layer_type: ClassVar[type[nn.Module]] = nn.Module

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str] | None) -> None:
        self.include = check_patterns(include, f"{self.label}(include")
        self.exclude = check_patterns(exclude, f"{self.label}(exclude")

    def rules(self) -> LayerRules:
        """The layer selection of the method's conversion (its baseline's ``*_rules``)."""
        raise NotImplementedError(f"{self.label} defines no layer rules")

    @override
    def plan(self, module: nn.Module) -> SparsifyReport:
        return plan_layers(module, self.rules())

    @property
    def messages(self) -> logging.Logger:
        """The logger of the method's own module (its console messages name it)."""
        return logging.getLogger(type(self).__module__)

    def finalize(self, module: nn.Module) -> list[str]:
        """Turn this method's layers into the ``nn.Linear`` layers of their trained (pruned)
        weights, in place, for evaluation or export; returns their names."""
        return replace_with_linear(module, self.layer_type)

    def method_layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The (name, layer) pairs of this method's layer type in ``module``."""
        return [(name, sub) for name, sub in module.named_modules() if type(sub) is self.layer_type]

    def candidates(self, module: nn.Module) -> list[str]:
        """Names of the ``nn.Linear`` layers of ``module`` this method would convert now."""
        return [decision.name for decision in self.plan(module).planned]

    def _nothing_to_convert(
        self, module: nn.Module, plan: SparsifyReport | None = None
    ) -> ValueError:
        """The error for a module in which no layer can be converted, with every reason
        (from ``plan``, the module's plan if already built)."""
        plan = plan if plan is not None else self.plan(module)
        reasons = plan.reasons_left_dense() or ["it has no nn.Linear layer"]
        return ValueError(
            f"{self.label}: no layer of {type(module).__name__} can be converted "
            f"({'; '.join(reasons)}); adjust {self.label}(include=..., exclude=...) "
            f"(include={list(self.include) if self.include is not None else None}, "
            f"exclude={list(self.rules().excluded)})"
        )

    def _refuse_conflicts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a second method in the same run, or a strategy that shards parameters.

        Raises:
            ValueError: the trainer has another training method (SLoPe included), the module
                holds SLoPe SparseLinear layers or another method's layers, or the strategy
                shards parameters.
        """
        self.refuse_other_methods(trainer)
        slope = sparse_layers(pl_module)
        if slope:
            raise ValueError(
                f"{self.label}: {type(pl_module).__name__} already has {len(slope)} SLoPe "
                f"SparseLinear layers (e.g. {slope[0][0]!r}); {self.label} trains dense "
                "nn.Linear layers: set model.sparsity.sparse: false (SLoPeModule), or do not "
                "sparsify the module"
            )
        foreign = [
            (name, type(sub).__name__)
            for name, sub in pl_module.named_modules()
            if isinstance(sub, METHOD_LAYERS) and type(sub) is not self.layer_type
        ]
        if foreign:
            raise ValueError(
                f"{self.label}: {type(pl_module).__name__} already has {len(foreign)} layers "
                f"of another method (e.g. {foreign[0][0]!r}, a {foreign[0][1]}); start from "
                "a dense module"
            )
        if isinstance(trainer.strategy, SHARDING_STRATEGIES):
            raise ValueError(
                f"{self.label} swaps the module's layers during the run, which "
                f"{type(trainer.strategy).__name__} (sharded parameters) does not allow; train "
                "on one device or with the DDP strategy"
            )

    def _total_steps(self, trainer: pl.Trainer, setting: str) -> int:
        """The run's optimizer steps (:func:`run_length`; ``setting``: e.g. ``"at=0.5"``)."""
        return run_length(trainer, f"{self.label}({setting})")


class ConvertedAtStart(BaselineMethod):
    """A method whose layers replace the ``nn.Linear`` layers when fitting starts and are
    turned back into ``nn.Linear`` at ``on_train_end``.

    The layers are converted in ``setup`` (fit), before a checkpoint loads and before the
    optimizer is built; a module that builds its layers in ``configure_model`` is converted at
    ``on_fit_start`` instead (the new layers share the Parameters the optimizer holds). The
    layers' state-dict keys are those of ``nn.Linear`` (``weight``, ``bias``), so a checkpoint
    taken mid-run resumes with ``ckpt_path`` and holds the dense master weights.
    """

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str] | None) -> None:
        super().__init__(include, exclude)
        self.converted: list[str] = []  # layers converted in this run

    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        """Convert the candidate layers in place; returns their names."""
        raise NotImplementedError

    def _ensure_converted(self, pl_module: pl.LightningModule, last_chance: bool) -> None:
        """Convert once per run; an earlier fit's layers of this method are kept as they are.

        Raises:
            ValueError: ``last_chance`` and no layer can be converted.
        """
        if self.converted:
            return
        existing = self.method_layers(pl_module)
        if existing:
            info(
                self.messages,
                "%s: %s already has %d %s layers; nothing converted",
                self.label,
                type(pl_module).__name__,
                len(existing),
                self.layer_type.__name__,
            )
            self.converted = [name for name, _ in existing]
            return
        plan = self.plan(pl_module)
        if not plan.planned:
            if last_chance:
                raise self._nothing_to_convert(pl_module, plan)
            return  # built in configure_model: converted at on_fit_start
        self.converted = self._convert(pl_module)
        info(
            self.messages,
            "%s: %d layers made %s: %s",
            self.label,
            len(self.converted),
            self.layer_type.__name__,
            ", ".join(self.converted),
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate / test evaluate the module as it is
        self.converted = []
        self._refuse_conflicts(trainer, pl_module)
        self._ensure_converted(
            pl_module, last_chance=not is_overridden("configure_model", pl_module)
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.converted:
            self._refuse_conflicts(trainer, pl_module)  # configure_model may have added some
        self._ensure_converted(pl_module, last_chance=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        replaced = self.finalize(pl_module)
        if replaced:  # none after a dense tail: the layers are nn.Linear already
            info(
                self.messages,
                "%s: %d layers turned into nn.Linear layers holding their pruned weights",
                self.label,
                len(replaced),
            )


# --------------------------------------------------------------------------------------------
# Finite checks (NonFiniteGuard, CrashCheckpoint)
# --------------------------------------------------------------------------------------------


def all_finite(tensors: list[Tensor]) -> bool:
    """True if every floating-point tensor is free of NaN/inf, on every rank when any tensor
    is sharded. One device sync (``.item``), plus one all-reduce for sharded tensors."""
    local = [local_part(t) for t in tensors]
    flags = [t.isfinite().all() for t in local if t.is_floating_point() and t.numel()]
    ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
    sharded = any(t is not lt for t, lt in zip(tensors, local, strict=True))
    if sharded and dist.is_available() and dist.is_initialized():
        device = local[0].device if local else torch.device("cpu")
        flag = ok.to(device=device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank decides alike
        ok = flag.bool()
    return bool(ok.item())


def first_non_finite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """Name and content of the first tensor with NaN/inf (the slow path: after a failure);
    a sharded tensor is judged by this rank's part."""
    for name, full in named:
        tensor = local_part(full)
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            nan = int(tensor.isnan().sum())
            inf = int(tensor.isinf().sum())
            return f"{name} ({nan} NaN, {inf} inf of {tensor.numel()} values)"
    return None


def non_finite_weights(module: torch.nn.Module) -> str | None:
    """The first parameter of ``module`` holding NaN/inf (named, with counts), or None."""
    params = list(module.named_parameters())
    if all_finite([p.detach() for _, p in params]):
        return None
    return first_non_finite((n, p.detach()) for n, p in params) or "a parameter"


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The checkpoint callback's last (else best) file, for messages that point at it."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path or "none written yet"
