"""The baseline 2:4 training methods as Lightning callbacks, selectable from a LightningCLI YAML.

Each callback trains a dense module (``SLoPeModule`` with ``model.sparsity.sparse: false``, or
any LightningModule with ``nn.Linear`` layers) with one of the methods SLoPe is compared with
(:mod:`slope_lightning.baselines`), and turns the trained layers back into plain ``nn.Linear``
layers holding the final N:M-pruned weights at ``on_train_end``: Lightning runs the callbacks'
``on_train_end`` before the LightningModule's, so ``SLoPeModule`` exports a plain model.

- :class:`SRSTE`: SR-STE (Zhou et al. 2021), an N:M mask recomputed from a dense master
  weight at every step, with the sparse-refined straight-through gradient.
- :class:`TransposableSparse`: dynamic transposable 2:4 (FST, Hu et al. 2024), optionally
  ending with a dense fine-tuning tail.
- :class:`OneShotPrune`: dense training, one magnitude or Wanda N:M pruning at a chosen step,
  then the mask fixed for the rest of training.

In a config::

    trainer:
      callbacks:
        - class_path: slope_lightning.method_callbacks.SRSTE
          init_args: {decay: 2.0e-4}

Layers are selected as :func:`~slope_lightning.sparse.sparsify` selects them (``include`` /
``exclude`` fnmatch patterns on names in ``pl_module.named_modules()``; by default every
``nn.Linear`` but LM heads and embeddings). Every new layer shares the Parameters of the
``nn.Linear`` it replaces, so an optimizer built over the dense model stays valid. One method
per run: a module that already holds SLoPe ``SparseLinear`` layers, or a trainer that also has
the ``SLoPe`` callback or another of these callbacks, is refused. They run on one device or
under DDP; sharding strategies (FSDP, ModelParallelStrategy, DeepSpeed) are refused.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from slope_lightning.baselines.oneshot import (
    METHODS,
    FixedMaskLinear,
    OneShotMethod,
    oneshot_finalize,
    oneshot_prune,
    wanda_input_norms,
)
from slope_lightning.baselines.srste import (
    DEFAULT_DECAY,
    SRSTELinear,
    srste_finalize,
    srste_sparsify,
)
from slope_lightning.baselines.transposable import (
    BACKENDS,
    TransposableBackend,
    TransposableSparseLinear,
    transposable_finalize,
    transposable_sparsify,
)
from slope_lightning.callbacks import SLoPe
from slope_lightning.sparse import DEFAULT_EXCLUDE, SparseLinear, sparse_layers
from slope_lightning.sparse.calibration import default_forward
from slope_lightning.sparse.masks import check_nm
from slope_lightning.sparse.sparsify import linear_candidates

__all__ = ["SRSTE", "OneShotPrune", "TransposableSparse"]

logger = logging.getLogger(__name__)

#: The layer types of the 2:4 training methods; a module holds those of one method at most.
METHOD_LAYERS: tuple[type[nn.Module], ...] = (
    SparseLinear,
    SRSTELinear,
    TransposableSparseLinear,
    FixedMaskLinear,
)

#: Strategies that shard parameters, whose layers these callbacks cannot swap.
SHARDING_STRATEGIES: tuple[type, ...] = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


@rank_zero_only
def _info(message: str, *args: object) -> None:
    logger.info(message, *args)


def _patterns(value: Sequence[str] | None, where: str) -> tuple[str, ...] | None:
    """``value`` as a tuple of fnmatch patterns (None stays None).

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


def _check_pattern(owner: str, n: int, m: int) -> None:
    """Raises a ValueError naming ``owner``'s n and m if N:M is not a valid pattern."""
    try:
        check_nm(n, m)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{owner}(n={n!r}, m={m!r}): {error}") from None


def _check_fraction(owner: str, name: str, value: float, closed_above: bool) -> None:
    """Raises a ValueError unless ``value`` is a number in [0, 1] (or [0, 1))."""
    upper = "1]" if closed_above else "1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 1
        or (value == 1 and not closed_above)
    ):
        raise ValueError(f"{owner}({name}={value!r}): give a fraction of the run in [0, {upper}")


def _round_half_up(value: float) -> int:
    """``value`` rounded to the nearest integer, halves up (Python's round() goes to even)."""
    return math.floor(value + 0.5)


class _BaselineMethod(Callback):
    """What the three methods share: the layer selection, the checks before converting, the
    run's length, and the final swap back to ``nn.Linear``.

    Args:
        include: fnmatch patterns of layer names to convert (None: every candidate).
        exclude: patterns left dense (None: LM heads and embeddings,
            :data:`~slope_lightning.sparse.DEFAULT_EXCLUDE`).
        multiple: what d_in must be a multiple of for a layer to be converted.
    """

    #: The layer type this method trains with.
    layer_type: ClassVar[type[nn.Module]] = nn.Module

    def __init__(
        self, include: Sequence[str] | None, exclude: Sequence[str] | None, multiple: int
    ) -> None:
        self.include = _patterns(include, f"{self.label}(include")
        self.exclude = _patterns(exclude, f"{self.label}(exclude")
        self.multiple = multiple

    @property
    def label(self) -> str:
        """The callback's name in messages."""
        return type(self).__name__

    def _exclude(self) -> tuple[str, ...]:
        return self.exclude if self.exclude is not None else DEFAULT_EXCLUDE

    def method_layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The (name, layer) pairs of this method's layer type in ``module``."""
        return [(name, sub) for name, sub in module.named_modules() if type(sub) is self.layer_type]

    def candidates(self, module: nn.Module) -> list[str]:
        """Names of the ``nn.Linear`` layers of ``module`` this method would convert now."""
        return [
            name
            for name, _, _, child, reason in linear_candidates(
                module, self.include, self._exclude(), self.multiple, "converted"
            )
            if reason is None and isinstance(child, nn.Linear)
        ]

    def _nothing_to_convert(self, module: nn.Module) -> ValueError:
        """The error for a module in which no layer can be converted, with every reason."""
        reasons = sorted(
            {
                reason
                for *_, reason in linear_candidates(
                    module, self.include, self._exclude(), self.multiple, "converted"
                )
                if reason is not None
            }
        ) or ["it has no nn.Linear layer"]
        return ValueError(
            f"{self.label}: no layer of {type(module).__name__} can be converted "
            f"({'; '.join(reasons)}); adjust {self.label}(include=..., exclude=...) "
            f"(include={list(self.include) if self.include is not None else None}, "
            f"exclude={list(self._exclude())})"
        )

    def _refuse_conflicts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a second method in the same run, or a strategy that shards parameters.

        Raises:
            ValueError: the trainer has another method callback (or SLoPe), the module holds
                SLoPe SparseLinear layers or another method's layers, or the strategy
                shards parameters.
        """
        others = [
            type(callback).__name__
            for callback in getattr(trainer, "callbacks", [])
            if callback is not self and isinstance(callback, SLoPe | _BaselineMethod)
        ]
        if others:
            raise ValueError(
                f"{self.label} cannot train beside {others[0]}: each is a different 2:4 "
                "training method; keep one of them in trainer.callbacks"
            )
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
        """The run's optimizer steps: ``trainer.estimated_stepping_batches`` (max_steps, or
        the steps of max_epochs when they end the run first).

        Raises:
            ValueError: the run's length is unknown (no max_steps and an infinite or unsized
                dataloader).
        """
        estimate = trainer.estimated_stepping_batches
        if not math.isfinite(estimate) or estimate < 1:
            raise ValueError(
                f"{self.label}({setting}) is a fraction of the run's optimizer steps, but the "
                f"run has no known length (max_steps={trainer.max_steps}, "
                f"max_epochs={trainer.max_epochs}, or a dataloader without a length); set "
                "trainer.max_steps"
            )
        return int(estimate)


class _ConvertedAtStart(_BaselineMethod):
    """A method whose layers replace the ``nn.Linear`` layers when fitting starts and are
    turned back into ``nn.Linear`` at ``on_train_end``.

    The layers are converted in ``setup`` (fit), before a checkpoint loads and before the
    optimizer is built; a module that builds its layers in ``configure_model`` is converted at
    ``on_fit_start`` instead (the new layers share the Parameters the optimizer holds). The
    layers' state-dict keys are those of ``nn.Linear`` (``weight``, ``bias``), so a checkpoint
    taken mid-run resumes with ``ckpt_path`` and holds the dense master weights.
    """

    def __init__(
        self, include: Sequence[str] | None, exclude: Sequence[str] | None, multiple: int
    ) -> None:
        super().__init__(include, exclude, multiple)
        self.converted: list[str] = []  # layers converted in this run

    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        """Convert the candidate layers in place; returns their names."""
        raise NotImplementedError

    def _finalize(self, pl_module: pl.LightningModule) -> list[str]:
        """Turn this method's layers into ``nn.Linear`` layers in place; returns their names."""
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
            _info(
                "%s: %s already has %d %s layers; nothing converted",
                self.label,
                type(pl_module).__name__,
                len(existing),
                self.layer_type.__name__,
            )
            self.converted = [name for name, _ in existing]
            return
        if not self.candidates(pl_module):
            if last_chance:
                raise self._nothing_to_convert(pl_module)
            return  # built in configure_model: converted at on_fit_start
        self.converted = self._convert(pl_module)
        _info(
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
        replaced = self._finalize(pl_module)
        if replaced:  # none after a dense tail: the layers are nn.Linear already
            _info(
                "%s: %d layers turned into nn.Linear layers holding their pruned weights",
                self.label,
                len(replaced),
            )


class SRSTE(_ConvertedAtStart):
    """Train with SR-STE: a dense master weight, an N:M magnitude mask recomputed from it at
    every forward, and the sparse-refined straight-through gradient (see
    :class:`~slope_lightning.baselines.SRSTELinear`).

    The selected ``nn.Linear`` layers become :class:`~slope_lightning.baselines.SRSTELinear`
    layers when fitting starts (sharing their Parameters). At ``on_train_end`` they become
    ``nn.Linear`` layers holding W ⊙ M(W), the N:M model the run trained, before
    ``SLoPeModule`` exports it. A checkpoint taken mid-run holds the dense master weights
    under ``nn.Linear``'s keys and resumes with ``ckpt_path``.

    Args:
        n, m: the N:M pattern (2:4 by default).
        decay: λ of the sparse-refined term λ (1 − M) ⊙ W added to the weight gradient (the
            paper's 2e-4; 0 gives the plain STE). Added at every backward: under gradient
            accumulation over k micro-batches, divide it by k to keep λ per step.
        include: fnmatch patterns of layer names to convert (None: every candidate).
        exclude: patterns left dense (None: LM heads and embeddings).

    Raises:
        ValueError: a bad setting (the message names it and the allowed values); when
            fitting starts, a module with no layer to convert, SLoPe layers or another
            method in the same run, or a sharding strategy.
    """

    layer_type = SRSTELinear

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        decay: float = DEFAULT_DECAY,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        _check_pattern("SRSTE", n, m)
        if (
            isinstance(decay, bool)
            or not isinstance(decay, int | float)
            or not math.isfinite(decay)
            or decay < 0
        ):
            raise ValueError(
                f"SRSTE(decay={decay!r}): give a number >= 0 (the paper's λ_W is 2e-4; 0 is "
                "the plain straight-through estimator)"
            )
        super().__init__(include, exclude, multiple=m)
        self.n = n
        self.m = m
        self.decay = float(decay)

    @override
    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        exclude = self._exclude()
        return srste_sparsify(pl_module, self.n, self.m, self.decay, self.include, exclude)

    @override
    def _finalize(self, pl_module: pl.LightningModule) -> list[str]:
        return srste_finalize(pl_module)


class TransposableSparse(_ConvertedAtStart):
    """Train with dynamic transposable 2:4 sparsity (FST, Hu et al., ICML 2024): a dense
    master weight pruned at every forward with a mask that is 2:4 along both dimensions (see
    :class:`~slope_lightning.baselines.TransposableSparseLinear`), optionally followed by
    FST's dense fine-tuning tail.

    The selected ``nn.Linear`` layers become TransposableSparseLinear layers when fitting
    starts (sharing their Parameters; both sizes must be multiples of 4). With ``dense_tail``
    > 0, from optimizer step ``total − round(dense_tail × total)`` on (total: the run's
    optimizer steps) the layers are ``nn.Linear`` again, holding the unmasked master weights,
    and train dense to the end: the exported model is then dense. Otherwise, at
    ``on_train_end`` each layer becomes an ``nn.Linear`` holding W ⊙ M, its transposable 2:4
    weight, before ``SLoPeModule`` exports it. A checkpoint taken mid-run (in the sparse part
    or the dense tail) resumes with ``ckpt_path``: the keys are ``nn.Linear``'s.

    Args:
        dense_tail: the fraction of the run's optimizer steps, at its end, trained dense, in
            [0, 1) (0: sparse to the end).
        backend: the GEMMs of the sparse layers: "auto" (a GPU semi-structured kernel where
            one can run, else the dense masked reference: the default, safe on CPU),
            "reference", "cutlass" or "cusparselt".
        include: fnmatch patterns of layer names to convert (None: every candidate).
        exclude: patterns left dense (None: LM heads and embeddings).

    Raises:
        ValueError: a bad setting (the message names it and the allowed values); when
            fitting starts, a module with no layer to convert, SLoPe layers or another
            method in the same run, or a sharding strategy; at train start, a dense tail in
            a run of unknown length.
    """

    layer_type = TransposableSparseLinear

    def __init__(
        self,
        dense_tail: float = 0.0,
        backend: TransposableBackend = "auto",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        _check_fraction("TransposableSparse", "dense_tail", dense_tail, closed_above=False)
        if backend not in BACKENDS:
            raise ValueError(
                f"TransposableSparse(backend={backend!r}): choose one of {', '.join(BACKENDS)}"
            )
        super().__init__(include, exclude, multiple=4)
        self.dense_tail = float(dense_tail)
        self.backend: TransposableBackend = backend
        self.dense_from: int | None = None  # the optimizer step the dense tail starts at
        self.densified_at: int | None = None

    @override
    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        exclude = self._exclude()
        return transposable_sparsify(pl_module, self.include, exclude, self.backend)

    @override
    def _finalize(self, pl_module: pl.LightningModule) -> list[str]:
        return transposable_finalize(pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.dense_from = None
            self.densified_at = None
        super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dense_tail == 0:
            return
        total = self._total_steps(trainer, f"dense_tail={self.dense_tail}")
        tail = _round_half_up(self.dense_tail * total)
        if tail == 0:
            _info(
                "TransposableSparse: dense_tail=%g of %d steps rounds to no step; sparse to "
                "the end",
                self.dense_tail,
                total,
            )
            return
        self.dense_from = total - tail
        _info(
            "TransposableSparse: transposable 2:4 until optimizer step %d, then dense for the "
            "last %d of %d steps",
            self.dense_from,
            tail,
            total,
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.dense_from is None or trainer.global_step < self.dense_from:
            return
        densified = _densify(pl_module)
        if densified:
            self.densified_at = trainer.global_step
            _info(
                "TransposableSparse: at optimizer step %d, %d layers are dense nn.Linear layers "
                "again (their unmasked master weights) for the dense tail",
                trainer.global_step,
                len(densified),
            )


def _densify(model: nn.Module) -> list[str]:
    """Replace every TransposableSparseLinear of ``model`` by an nn.Linear holding its master
    weight and bias, unmasked and shared (the optimizer keeps them); returns their names."""
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, TransposableSparseLinear):
                linear = nn.Linear(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    device="meta",  # placeholders, replaced by the layer's Parameters below
                    dtype=child.weight.dtype,
                )
                linear.weight = child.weight
                linear.bias = child.bias  # type: ignore[assignment]
                linear.train(child.training)
                setattr(parent, attr, linear)
                replaced.append(f"{parent_name}.{attr}" if parent_name else attr)
    return replaced


class OneShotPrune(_BaselineMethod):
    """Train dense, prune N:M once at a chosen step, then fine-tune with the mask fixed.

    At optimizer step ``round(at × total)`` (halves up; total: the run's optimizer steps),
    before that step's batch, every selected ``nn.Linear`` is pruned once (magnitude or Wanda,
    see :func:`~slope_lightning.baselines.oneshot_prune`) into a
    :class:`~slope_lightning.baselines.FixedMaskLinear` sharing its Parameters, and trains
    with that mask for the remaining steps: a sparse fine-tune. The optimizer state of the
    pruned entries (e.g. AdamW's moments) is zeroed too, so the pruned weights stay exactly
    zero. ``at=1.0`` prunes the final dense weights at ``on_train_end`` (no fine-tune);
    ``at=0.0`` prunes the initial weights before the first step (a static mask from
    initialisation). A run that ends before its prune step (e.g. stopped early) is pruned at
    ``on_train_end``. At ``on_train_end`` the layers become ``nn.Linear`` layers holding the
    pruned weights, before ``SLoPeModule`` exports them.

    **Wanda** takes the input norms ‖X_j‖₂ from the last ``calibration_batches`` training
    batches up to the prune step, the batch about to be trained on included (so ``at=0.0``
    calibrates on the first batch): their inputs (a batch's first element, or a mapping
    given as keywords) are kept as they arrive, never drawn again from the dataloader, and
    fed through the module in eval mode without gradients. Under DDP the norms are reduced
    over all ranks, so every rank chooses the same mask. A run resumed before its prune step
    calibrates on the batches seen since the resume.

    **Resume.** The callback's state records whether and when it pruned. A checkpoint taken
    after pruning holds each pruned layer's ``positions`` buffer; when such a checkpoint loads
    (``trainer.fit(ckpt_path=...)``, or ``trainer.validate(ckpt_path=...)`` with this
    callback), a load hook turns the selected layers into FixedMaskLinear layers just before
    the weights load, so the checkpoint's masks and weights load strictly and training
    continues with them (not pruned again). Without the callback, such a checkpoint does not
    load into a dense module (its ``positions`` keys are unexpected).

    Args:
        at: when to prune, as a fraction of the run's optimizer steps in [0, 1].
        method: "magnitude" (|W|) or "wanda" (|W| · ‖X_j‖₂).
        n, m: the N:M pattern (2:4 by default).
        calibration_batches: how many recent training batches Wanda's norms come from.
        include: fnmatch patterns of layer names to prune (None: every candidate).
        exclude: patterns left dense (None: LM heads and embeddings).

    Raises:
        ValueError: a bad setting (the message names it and the allowed values); when
            fitting starts, a module with no layer to prune, SLoPe layers or another method in
            the same run, or a sharding strategy; at train start, a fractional ``at`` in a run
            of unknown length.
        RuntimeError: the callback's checkpoint state says it pruned, but the model loaded
            dense.
    """

    layer_type = FixedMaskLinear

    def __init__(
        self,
        at: float = 1.0,
        method: OneShotMethod = "magnitude",
        n: int = 2,
        m: int = 4,
        calibration_batches: int = 8,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        _check_fraction("OneShotPrune", "at", at, closed_above=True)
        if method not in METHODS:
            raise ValueError(f"OneShotPrune(method={method!r}): choose one of {', '.join(METHODS)}")
        _check_pattern("OneShotPrune", n, m)
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"OneShotPrune(calibration_batches={calibration_batches!r}): give a positive "
                "number of batches"
            )
        super().__init__(include, exclude, multiple=m)
        self.at = float(at)
        self.method: OneShotMethod = method
        self.n = n
        self.m = m
        self.calibration_batches = calibration_batches
        self.pruned = False
        self.pruned_at: int | None = None  # the optimizer step it pruned at
        self.pruned_layers: list[str] = []
        self.prune_step: int | None = None  # None: at on_train_end
        self._inputs: collections.deque[Any] = collections.deque(maxlen=calibration_batches)
        self._load_hook: RemovableHandle | None = None

    # ------------------------------------------------------------------ pruning

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune the selected layers now, zero their pruned entries' optimizer state.

        Raises:
            ValueError: no layer to prune, or Wanda without any batch seen.
        """
        norms = None
        if self.method == "wanda":
            if not self._inputs:
                raise ValueError(
                    "OneShotPrune(method='wanda') saw no training batch to calibrate on before "
                    f"pruning at step {trainer.global_step}; give a run with training batches "
                    "before the end, or use method='magnitude'"
                )
            norms = wanda_input_norms(
                pl_module,
                list(self._inputs),
                forward=default_forward,
                m=self.m,
                include=self.include,
                exclude=self._exclude(),
            )
            if trainer.world_size > 1:  # the same mask on every rank: norms over all tokens
                norms = {
                    name: trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
                    for name, norm in norms.items()
                }
        layers = oneshot_prune(
            pl_module, self.n, self.m, self.method, norms, self.include, self._exclude()
        )
        if not layers:
            raise self._nothing_to_convert(pl_module)
        _zero_pruned_optimizer_state(trainer, pl_module)
        self.pruned = True
        self.pruned_at = trainer.global_step
        self.pruned_layers = layers
        self._inputs.clear()
        _info(
            "OneShotPrune: %d layers pruned %d:%d by %s at optimizer step %d (their masks "
            "stay fixed from here): %s",
            len(layers),
            self.n,
            self.m,
            self.method,
            trainer.global_step,
            ", ".join(layers),
        )

    def _convert_for_loading(self, pl_module: pl.LightningModule) -> None:
        """Give the selected layers FixedMaskLinear's structure (their masks and weights are
        about to be replaced by a checkpoint's)."""
        layers = oneshot_prune(
            pl_module, self.n, self.m, "magnitude", None, self.include, self._exclude()
        )
        _info(
            "OneShotPrune: the checkpoint was taken after pruning: %d layers made "
            "FixedMaskLinear to load its masks and weights",
            len(layers),
        )

    # ------------------------------------------------------------------ hooks

    def _remove_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        if stage == "fit":
            self._refuse_conflicts(trainer, pl_module)
            self.pruned = False
            self.pruned_at = None
            self.pruned_layers = []
            self.prune_step = None
            self._inputs.clear()

        # Lightning loads a checkpoint's weights after configure_model, and the callbacks'
        # state only after them: a load pre-hook on the module converts it just before, if
        # the checkpoint holds pruned layers.
        def before_load(
            module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
        ) -> None:
            if self.method_layers(pl_module):
                return
            names = self.candidates(pl_module)
            if any(f"{prefix}{name}.positions" in state_dict for name in names):
                self._convert_for_loading(pl_module)

        self._load_hook = pl_module.register_load_state_dict_pre_hook(before_load)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        existing = self.method_layers(pl_module)
        if self.pruned and not existing:
            raise RuntimeError(
                f"OneShotPrune: the checkpoint's callback state says it pruned at step "
                f"{self.pruned_at}, but {type(pl_module).__name__} holds no FixedMaskLinear "
                "layer: the checkpoint's weights are not those of a pruned model; resume from "
                "the checkpoint file as saved, with the same include/exclude"
            )
        if existing and not self.pruned:  # pruned by an earlier fit of this module
            self.pruned = True
            self.pruned_layers = [name for name, _ in existing]
            _info(
                "OneShotPrune: %s already has %d FixedMaskLinear layers; not pruned again",
                type(pl_module).__name__,
                len(existing),
            )
        if not self.pruned:
            self._refuse_conflicts(trainer, pl_module)  # configure_model may have added some
            if not self.candidates(pl_module):
                raise self._nothing_to_convert(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:
            return
        if self.at == 0:
            self.prune_step = 0
        elif self.at < 1:
            total = self._total_steps(trainer, f"at={self.at}")
            step = _round_half_up(self.at * total)
            self.prune_step = step if step < total else None
        _info(
            "OneShotPrune: %s pruning %s",
            self.method,
            f"at optimizer step {self.prune_step}"
            if self.prune_step is not None
            else "at the end of training",
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruned:
            return
        if self.method == "wanda":
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            self._inputs.append(inputs.detach() if isinstance(inputs, Tensor) else inputs)
        if self.prune_step is not None and trainer.global_step >= self.prune_step:
            self._prune(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.pruned:
            self._prune(trainer, pl_module)
        replaced = oneshot_finalize(pl_module)
        _info(
            "OneShotPrune: %d layers turned into nn.Linear layers holding their pruned weights",
            len(replaced),
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._inputs.clear()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "pruned": self.pruned,
            "pruned_at": self.pruned_at,
            "pruned_layers": list(self.pruned_layers),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = bool(state_dict.get("pruned", False))
        self.pruned_at = state_dict.get("pruned_at")
        self.pruned_layers = list(state_dict.get("pruned_layers", []))


@torch.no_grad()
def _zero_pruned_optimizer_state(trainer: pl.Trainer, module: nn.Module) -> None:
    """Zero every optimizer state tensor shaped like a pruned weight at its pruned entries
    (AdamW's moments, SGD's momentum): no update moves a pruned weight away from zero."""
    for _, layer in module.named_modules():
        if not isinstance(layer, FixedMaskLinear):
            continue
        mask = layer.mask()
        for optimizer in trainer.optimizers:
            state = optimizer.state.get(layer.weight, {})
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == layer.weight.shape:
                    value.mul_(mask)
