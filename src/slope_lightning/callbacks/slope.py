"""The SLoPe callback: make any LightningModule SLoPe-sparse when the trainer starts.

The other callbacks (MaskScheduler, LazyLoRA) find the converted layers through
:func:`~slope_lightning.callbacks.shared.sparse_layers_after_conversion`, which asks this
callback (a :class:`~slope_lightning.callbacks.shared.TrainingMethod`) to convert first.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from slope_lightning.callbacks.lightning_internals import rebuild_optimizers
from slope_lightning.callbacks.shared import (
    TrainingMethod,
    check_count,
    info,
    mask_schedule_owned,
)
from slope_lightning.sparse import (
    MASK_METHODS,
    MaskMethod,
    SparsifyReport,
    SparsityConfig,
    follow_optimizer,
)
from slope_lightning.sparse.calibration import (
    ForwardFn,
    collect_input_norms,
    wanda_sparsify_planned,
)
from slope_lightning.sparse.sparsify import plan_sparsify, sparsify_planned

logger = logging.getLogger(__name__)


class SLoPe(TrainingMethod):
    """Make any LightningModule SLoPe-sparse when the trainer starts, as ``ModelPruning`` prunes.

    The module stays as it is: its ``nn.Linear`` layers and transformers' ``Conv1D`` layers
    (GPT-2's; all but the LM head, embeddings and poolers by default, see
    :func:`~slope_lightning.sparse.sparsify`; names as in ``pl_module.named_modules()``)
    become SparseLinear layers before the optimizer is built,
    so ``configure_optimizers`` sees the sparse values. ``MaskScheduler`` and ``LazyLoRA``
    work beside it, in any order of the callback list. Once per run, at the first point
    that applies:

    1. ``setup`` (fit): a module that does not override ``configure_model`` has its layers
       since ``__init__``; they are converted before a checkpoint loads, before the
       optimizer is built and before a strategy wraps the model (DDP).
    2. Just before a checkpoint's weights load (resume, or ``validate`` / ``test`` with a
       ``ckpt_path``), when the checkpoint holds packed sparse layers: a module that builds
       its model in ``configure_model`` is converted then (Lightning loads after
       ``configure_model``), so the checkpoint loads strictly, adapters included. A load
       pre-hook on the module does this; it is removed at the end of the run.
    3. ``on_fit_start``: a module that builds its model in ``configure_model`` and starts
       fresh. The optimizer that ``configure_optimizers`` built over the dense weights is
       rebuilt (``configure_optimizers`` runs again, before any step). A strategy that has
       wrapped the model by then (DDP, FSDP, DeepSpeed) is refused: build the layers in
       ``__init__``, or call :func:`~slope_lightning.sparse.sparsify` at the end of
       ``configure_model``. Put SLoPe before other callbacks that change the optimizer
       in ``on_fit_start``.
    4. ``on_validation_start`` / ``on_test_start`` / ``on_predict_start`` of an evaluation
       run (e.g. held-out perplexity after one-shot pruning of a dense model).

    **Masks.** ``"magnitude"`` (the paper), ``"random"``, or ``"wanda"``: |W|·‖X‖ on
    ``calibration_batches`` batches of the training data (``calibration_data`` if given,
    else the datamodule's ``train_dataloader()``, else the module's), fed through the module
    (:func:`~slope_lightning.sparse.calibration.default_forward`: a tuple's first element, a
    mapping as keywords) on the strategy's root device. A resumed run takes its masks from
    the checkpoint; a module converted in ``setup`` (1.) still calibrates, a few forward
    passes spent for nothing on a resume.

    **Optimizer steps.** Without a MaskScheduler (which owns the M_C schedule when attached),
    the callback reports every optimizer step to the layers it converted
    (:func:`~slope_lightning.sparse.follow_optimizer`), the refresh's one step counter (needed
    under FSDP2 and for ``transpose_mask_interval`` > 1); a module that calls
    ``follow_optimizer`` itself should sparsify itself instead of using this callback (each
    step would count twice).

    Args:
        n, m: the N:M pattern (2:4 by default).
        include: fnmatch patterns of layer names to convert (None: every candidate).
        exclude: patterns left dense (None: the LM head and embeddings).
        backend: GEMM backend of the converted layers ("reference", "cusparselt", "cutlass",
            "auto", ...).
        max_aspect_ratio: leave layers with max(d_out/d_in, d_in/d_out) above this dense.
        transpose_mask_interval: optimizer steps between M_C refreshes when no MaskScheduler
            owns the schedule.
        mask_method: "magnitude", "random" or "wanda".
        calibration_batches: batches Wanda's norms are collected over.
        config: a :class:`SparsityConfig` holding n, m, include, exclude, backend,
            max_aspect_ratio, transpose_mask_interval and mask_method instead of the keywords
            (which must then keep their defaults).
        calibration_data: batches for Wanda (API only; an iterable, e.g. a DataLoader).
        calibration_forward: how a calibration batch is fed to the module (API only).
        seed: seed of random masks.

    Raises:
        ValueError: a bad setting (the message names it and the allowed values); when the
            trainer starts, a module in which no layer could be converted (each reason
            listed), Wanda without calibration data, or another training method (SR-STE, ...)
            in the same run.
        TypeError: a config together with a changed keyword setting.
        RuntimeError: at ``on_fit_start``, a dense model already wrapped by the strategy.

    Example:
        >>> trainer = pl.Trainer(callbacks=[SLoPe(), MaskScheduler(), LazyLoRA()])
        ... # doctest: +SKIP
        >>> trainer.fit(AnyLightningModule(), datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        backend: str = "reference",
        max_aspect_ratio: float | None = None,
        transpose_mask_interval: int | None = 1,
        mask_method: MaskMethod = "magnitude",
        calibration_batches: int = 8,
        config: SparsityConfig | None = None,
        calibration_data: Iterable[Any] | None = None,
        calibration_forward: ForwardFn | None = None,
        seed: int | None = None,
    ) -> None:
        if mask_method not in MASK_METHODS:
            raise ValueError(
                f"SLoPe(mask_method={mask_method!r}): choose one of {list(MASK_METHODS)}"
            )
        check_count("SLoPe", "calibration_batches", calibration_batches, "batches")
        settings: dict[str, Any] = {
            "n": n,
            "m": m,
            "include": include,
            "exclude": exclude,
            "backend": backend,
            "max_aspect_ratio": max_aspect_ratio,
            "transpose_mask_interval": transpose_mask_interval,
        }
        if config is not None:
            changed = [key for key, value in settings.items() if value != _SLOPE_DEFAULTS[key]] + (
                ["mask_method"] if mask_method != "magnitude" else []
            )
            if changed:
                raise TypeError(
                    f"SLoPe(config=...) takes every setting from the SparsityConfig, but "
                    f"{', '.join(changed)} were given too; put them in the config"
                )
            if not config.sparse:
                raise ValueError("SLoPe(config=...): the config has sparse=False")
            mask_method = config.mask_method
        else:
            try:
                config = SparsityConfig(
                    mask_method="random" if mask_method == "random" else "magnitude", **settings
                )
            except ValueError as error:
                raise ValueError(f"SLoPe: {error}") from None
        self.config = config
        self.mask_method: MaskMethod = mask_method
        self.calibration_batches = calibration_batches
        self.calibration_data = calibration_data
        self.calibration_forward = calibration_forward
        self.seed = seed
        self.report: SparsifyReport | None = None
        self._done = False
        self._converted: list[str] = []  # layers this callback converted in this run
        self._load_hook: RemovableHandle | None = None
        self._step_hooks: list[RemovableHandle] = []

    # ------------------------------------------------------------------ what to convert

    @override
    def plan(self, module: nn.Module) -> SparsifyReport:
        """The plan of converting ``module`` now (:func:`~slope_lightning.sparse.sparsify.
        plan_sparsify` of the config: ``nn.Linear`` and transformers ``Conv1D`` layers; its
        planned layers are those Wanda calibrates). Built once per conversion."""
        method = "wanda_sparsify" if self.mask_method == "wanda" else "sparsify"
        return plan_sparsify(module, self.config, method=method)

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        source: Iterable[Any] | None = self.calibration_data
        datamodule = getattr(trainer, "datamodule", None)
        if (
            source is None
            and datamodule is not None
            and is_overridden("train_dataloader", datamodule)
        ):
            source = datamodule.train_dataloader()
        if source is None and is_overridden("train_dataloader", pl_module):
            source = pl_module.train_dataloader()
        if source is None:
            raise ValueError(
                "SLoPe(mask_method='wanda') needs calibration batches: fit with a datamodule "
                "(its train_dataloader() is used), define train_dataloader() on the module, "
                "or pass SLoPe(calibration_data=...)"
            )
        return itertools.islice(source, self.calibration_batches)

    def _convert(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        calibrate: bool,
        plan: SparsifyReport | None = None,
    ) -> bool:
        """Convert the layers of ``plan`` (the module's plan now, if None) now; True if any
        layer was converted. The plan is built once and converted once."""
        self._done = True
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        plan = plan if plan is not None else self.plan(pl_module)
        if not plan.planned and plan.converted:
            return False  # converted already (an earlier run of the same module)
        if plan.planned and calibrate and self.mask_method == "wanda":
            if self.calibration_forward is None and not is_overridden("forward", pl_module):
                raise ValueError(
                    f"SLoPe(mask_method='wanda') feeds calibration batches to the module, but "
                    f"{type(pl_module).__name__} defines no forward(); define one, or pass "
                    "SLoPe(calibration_forward=lambda module, batch: ...)"
                )
            pl_module.to(trainer.strategy.root_device)  # where the strategy puts it anyway
            batches = self._calibration_batches(trainer, pl_module)
            names = [decision.name for decision in plan.planned]
            norms = collect_input_norms(pl_module, batches, self.calibration_forward, names)
            report = wanda_sparsify_planned(pl_module, plan, norms, self.config)
        else:
            # Without calibration (a resume, whose checkpoint's masks replace them), Wanda's
            # layers are chosen by magnitude: the config's mask_method is magnitude or random.
            report = sparsify_planned(pl_module, plan, self.config, seed=self.seed)
        if not report.converted:
            reasons = sorted({d.reason for d in report.layers}) or [
                "it has no nn.Linear or Conv1D layer"
            ]
            raise ValueError(
                f"SLoPe: no layer of {type(pl_module).__name__} could be made "
                f"{self.config.n}:{self.config.m} sparse ({'; '.join(reasons)}); adjust "
                "include/exclude or m"
            )
        self.report = report
        self._converted = [d.name for d in report.converted if d.reason.startswith("converted")]
        info(logger, "SLoPe: %s", report)
        return bool(self._converted)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.refuse_other_methods(trainer)  # one training method per run
        self._remove_hooks()
        self._done = False
        self._converted = []
        if stage == "fit" and not is_overridden("configure_model", pl_module):
            self._convert(trainer, pl_module, calibrate=True)
            return

        # Lightning loads a checkpoint's weights after configure_model and before
        # configure_optimizers, with no callback hook in between: a load pre-hook on the
        # module converts it just before, if the checkpoint holds sparse layers.
        def before_load(
            module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
        ) -> None:
            if not self._done and any(key.endswith(".row_index") for key in state_dict):
                self._convert(trainer, pl_module, calibrate=False)

        self._load_hook = pl_module.register_load_state_dict_pre_hook(before_load)

    @override
    def ensure_converted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert at fit start if not done yet, rebuilding the optimizer (idempotent).

        Called by this callback's ``on_fit_start`` and, through
        :func:`~slope_lightning.callbacks.shared.sparse_layers_after_conversion`, by
        MaskScheduler's and LazyLoRA's, so they find the layers whatever the order of the
        callbacks.

        Raises:
            RuntimeError: the strategy has wrapped the dense model already.
        """
        if not self._done:
            plan = self.plan(pl_module)
            if plan.planned and trainer.strategy.model is not pl_module:
                raise RuntimeError(
                    f"SLoPe: {type(pl_module).__name__} builds its layers in configure_model, "
                    f"and {type(trainer.strategy).__name__} has already wrapped the dense "
                    "model, so its parameters can no longer be swapped; build the layers in "
                    "__init__ (SLoPe then converts them in setup), or call "
                    "slope_lightning.sparsify(...) at the end of configure_model"
                )
            converted = self._convert(trainer, pl_module, calibrate=True, plan=plan)
            if converted and trainer.optimizers:
                # configure_optimizers saw the dense weights; no step has run yet.
                rebuild_optimizers(trainer)
                info(logger, "SLoPe: optimizers rebuilt over the sparse parameters")
        if self._converted and not self._step_hooks and not mask_schedule_owned(trainer):
            # A MaskScheduleOwner (MaskScheduler) owns the refresh schedule and counts
            # nothing; without one, the layers count optimizer steps through this hook (fused
            # optimizers included).
            self._step_hooks = [follow_optimizer(pl_module, opt) for opt in trainer.optimizers]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_converted(trainer, pl_module)

    def _convert_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._done:
            # Evaluation loops run under inference mode, whose tensors cannot become
            # parameters that train later: the new layers are built outside it.
            with torch.inference_mode(False):
                self._convert(trainer, pl_module, calibrate=True)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    def _remove_hooks(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()


#: SLoPe's keyword defaults, to tell a changed keyword from a default beside a config.
_SLOPE_DEFAULTS: dict[str, Any] = {
    "n": 2,
    "m": 4,
    "include": None,
    "exclude": None,
    "backend": "reference",
    "max_aspect_ratio": None,
    "transpose_mask_interval": 1,
}
