"""Lightning callbacks for SLoPe: the conversion, the transposed-mask schedule, lazy adapters,
token throughput.

They act through hooks only and work with any LightningModule: one whose model was sparsified
with :func:`slope_lightning.sparsify` (in its ``__init__`` or ``configure_model``), or any
module at all with the :class:`SLoPe` callback, which converts it when the trainer starts. The
others find the sparse layers when training starts (``on_fit_start``: after
``configure_model``, after a checkpoint's weights loaded). On a module without sparse layers
(the dense baseline under the same config) they say once that they are idle and do nothing.
Console messages come from global rank 0 only.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from slope_lightning.models import TransformerConfig
from slope_lightning.models.pretrained import (
    DEFAULT_CACHE_DIR,
    PRETRAINED,
    held_out_perplexity,
    load_pretrained,
)
from slope_lightning.optim import (
    check_adapter_placement,
    param_group_named,
    place_adapter_params,
    put_back_group,
    set_aside_empty_group,
)
from slope_lightning.sparse import (
    DEFAULT_EXCLUDE,
    SparseLinear,
    SparsifyReport,
    SparsityConfig,
    densify,
    follow_optimizer,
    sparse_layers,
    sparsify,
)
from slope_lightning.sparse.adapters import AdapterInit, resolve_rank
from slope_lightning.sparse.calibration import (
    MASK_SELECTIONS,
    ForwardFn,
    MaskSelection,
    collect_input_norms,
    wanda_sparsify,
)
from slope_lightning.sparse.sparsify import linear_like_candidates

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
    trainer: pl.Trainer, pl_module: pl.LightningModule, who: str
) -> list[tuple[str, SparseLinear]]:
    """The module's SparseLinear layers by name; if there are none, say that ``who`` is idle.

    A :class:`SLoPe` callback of the trainer converts the module first, wherever it stands in
    the callback list, so the layers are found whatever the order.
    """
    for callback in getattr(trainer, "callbacks", []):  # set on the trainer at init
        if isinstance(callback, SLoPe):
            callback.ensure_converted(trainer, pl_module)
    layers = sparse_layers(pl_module)
    if not layers:
        rank_zero_warn(
            f"{who} is idle: the LightningModule has no SparseLinear layer (a dense baseline, "
            "e.g. model.sparsity.sparse: false). To train with SLoPe, add the SLoPe callback, "
            "or call slope_lightning.sparsify(model) in the module's __init__ or "
            "configure_model."
        )
    return layers


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


class SLoPe(Callback):
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
    (:func:`~slope_lightning.sparse.follow_optimizer`), so ``transpose_mask_interval`` counts
    the steps of fused optimizers too; a module that calls ``follow_optimizer`` itself should
    sparsify itself instead of using this callback (each step would count twice).

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
            listed), or Wanda without calibration data.
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
        mask_method: MaskSelection = "magnitude",
        calibration_batches: int = 8,
        config: SparsityConfig | None = None,
        calibration_data: Iterable[Any] | None = None,
        calibration_forward: ForwardFn | None = None,
        seed: int | None = None,
    ) -> None:
        if mask_method not in MASK_SELECTIONS:
            raise ValueError(
                f"SLoPe(mask_method={mask_method!r}): choose one of {list(MASK_SELECTIONS)}"
            )
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"SLoPe(calibration_batches={calibration_batches!r}): give a positive number "
                "of batches"
            )
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
            calibration_batches = int(getattr(config, "calibration_batches", calibration_batches))
        else:
            try:
                config = SparsityConfig(
                    mask_method="random" if mask_method == "random" else "magnitude", **settings
                )
            except ValueError as error:
                raise ValueError(f"SLoPe: {error}") from None
        self.config = config
        self.mask_method: MaskSelection = mask_method
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

    def _sparsify_config(self) -> SparsityConfig:
        """The config ``sparsify`` gets: Wanda's layers are chosen alike (by magnitude only
        on a resume, where the checkpoint's masks replace them)."""
        if self.config.mask_method in ("magnitude", "random"):
            return self.config
        return dataclasses.replace(self.config, mask_method="magnitude")

    def dense_candidates(self, pl_module: nn.Module) -> list[str]:
        """Names of the ``nn.Linear`` and transformers ``Conv1D`` layers that conversion would
        turn sparse now (the layers Wanda calibrates)."""
        config = self.config
        exclude = tuple(config.exclude) if config.exclude is not None else DEFAULT_EXCLUDE
        ratio = config.max_aspect_ratio
        return [
            candidate.name
            for candidate in linear_like_candidates(
                pl_module,
                config.include,
                exclude,
                config.m,
                "sparsified",
                f"m={config.m}",
                transposed=True,  # Conv1D too: sparsify and wanda_sparsify convert it
            )
            if candidate.reason is None
            and (
                ratio is None
                or max(candidate.in_features, candidate.out_features)
                <= ratio * min(candidate.in_features, candidate.out_features)
            )
        ]

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

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, calibrate: bool) -> bool:
        """Convert the dense candidates now; True if any layer was converted."""
        self._done = True
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None
        names = self.dense_candidates(pl_module)
        if not names and sparse_layers(pl_module):
            return False  # converted already (an earlier run of the same module)
        if names and calibrate and self.mask_method == "wanda":
            if self.calibration_forward is None and not is_overridden("forward", pl_module):
                raise ValueError(
                    f"SLoPe(mask_method='wanda') feeds calibration batches to the module, but "
                    f"{type(pl_module).__name__} defines no forward(); define one, or pass "
                    "SLoPe(calibration_forward=lambda module, batch: ...)"
                )
            pl_module.to(trainer.strategy.root_device)  # where the strategy puts it anyway
            batches = self._calibration_batches(trainer, pl_module)
            norms = collect_input_norms(pl_module, batches, self.calibration_forward, names)
            report = wanda_sparsify(pl_module, norms, self.config)
        else:
            report = sparsify(pl_module, self._sparsify_config(), seed=self.seed)
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
        _info("SLoPe: %s", report)
        return bool(self._converted)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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

    def ensure_converted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Convert at fit start if not done yet, rebuilding the optimizer (idempotent).

        Called by this callback's ``on_fit_start`` and by MaskScheduler's and LazyLoRA's, so
        they find the layers whatever the order of the callbacks.

        Raises:
            RuntimeError: the strategy has wrapped the dense model already.
        """
        if not self._done:
            if self.dense_candidates(pl_module) and trainer.strategy.model is not pl_module:
                raise RuntimeError(
                    f"SLoPe: {type(pl_module).__name__} builds its layers in configure_model, "
                    f"and {type(trainer.strategy).__name__} has already wrapped the dense "
                    "model, so its parameters can no longer be swapped; build the layers in "
                    "__init__ (SLoPe then converts them in setup), or call "
                    "slope_lightning.sparsify(...) at the end of configure_model"
                )
            if self._convert(trainer, pl_module, calibrate=True) and trainer.optimizers:
                # configure_optimizers saw the dense weights; no step has run yet.
                trainer.strategy.setup_optimizers(trainer)
                _info("SLoPe: optimizers rebuilt over the sparse parameters")
        owned = any(isinstance(c, MaskScheduler) for c in getattr(trainer, "callbacks", []))
        if self._converted and not self._step_hooks and not owned:
            # A MaskScheduler owns the refresh schedule and counts nothing; without one, the
            # layers count optimizer steps through this hook (fused optimizers included).
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
        layers = _sparse_layers_or_idle(trainer, pl_module, "MaskScheduler")
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
    merged inference path stays exact) and puts the new parameters into the running optimizer's
    param group named ``"adapters"``: the empty one that
    :func:`~slope_lightning.optim.adapter_param_group` declared in ``configure_optimizers``
    (any torch scheduler, SequentialLR and ReduceLROnPlateau included: it has scheduled that
    group from the first step), else a new group that follows the LR schedule (see
    :func:`~slope_lightning.optim.add_param_group_following_schedule` for the rule and the
    supported schedulers). Under DDP, adapters start identical on every rank (seeded) and
    their gradients are averaged across ranks by this callback (DDP's reducer was built before
    they existed).

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
            estimate = trainer.estimated_stepping_batches
            if not math.isfinite(estimate) or estimate < 1:
                raise ValueError(
                    f"LazyLoRA(start={self.start}) is a fraction of the run's optimizer steps, "
                    f"but the run has no known length (max_steps={trainer.max_steps}, "
                    f"max_epochs={trainer.max_epochs}, or a dataloader without a length); "
                    "set trainer.max_steps or give start as a step number"
                )
            self._total_steps = int(estimate)
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
        layers = _sparse_layers_or_idle(trainer, pl_module, "LazyLoRA")
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
        if trainer.strategy.restore_checkpoint_after_setup:
            # FSDP2: a checkpoint may load next, and torch's loader refuses an empty declared
            # group when the checkpoint's holds adapters; it is put back at train start.
            self._set_aside = set_aside_empty_group(trainer.optimizers[0], "adapters")

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
                _info(
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
            import copy

            rank = self.resolved_rank(pl_module)
            for name, layer in sparse_layers(pl_module):
                if layer.adapter is None:  # placeholder values, overwritten by the load
                    generator = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
                    layer.add_adapter(rank, init=self.init, alpha=self.alpha, generator=generator)
            schedules = [config.scheduler for config in trainer.lr_scheduler_configs]
            restored = [copy.deepcopy(schedule.state_dict()) for schedule in schedules]
            self._add_optimizer_group(trainer, pl_module)
            for schedule, state in zip(schedules, restored, strict=True):
                schedule.load_state_dict(state)  # the checkpoint's base lrs, one lambda more
            self._reload_checkpoint(trainer, pl_module)
            self.active = True
            _info("LazyLoRA: resumed with adapters on (switched on at step %s)", self.started_at)
            return
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
        trainer.optimizers[0].state.clear()  # rebuilt for every parameter by the load
        trainer.strategy.load_checkpoint(trainer.ckpt_path)  # type: ignore[arg-type]
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
        declared = param_group_named(trainer.optimizers[0], "adapters") is not None
        group = place_adapter_params(
            trainer.optimizers[0],
            [config.scheduler for config in trainer.lr_scheduler_configs],
            self._adapter_parameters(pl_module),
            name="adapters",
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
        base, now = float(group.get("initial_lr", group["lr"])), float(group["lr"])
        _info(
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


class InitFromPretrained(Callback):
    """Start a fresh run from pretrained dense weights: the sparse layers take their masks and
    values from them (one-shot Wanda or magnitude pruning), everything else is copied.

    In ``setup`` of a fit, before the optimizer is built: a dense twin of the module's model
    (``pl_module.<attribute>``, SparseLinear layers made ``nn.Linear``) receives the
    pretrained weights; each layer that is sparse in the model is pruned on the twin with
    the layer's N:M pattern (Wanda on ``calibration_batches`` training batches, or
    magnitude), and the twin's state is loaded into the model, so the model keeps its
    layers, backends and any sharding hooks set up later. A dense model (the baseline run)
    simply gets the weights. A sparse layer made from a transformers ``Conv1D`` (GPT-2) takes
    its dense weight in the Conv1D layout, (d_in, d_out), as the pretrained checkpoint stores
    it; the twin holds it as an ``nn.Linear`` (transposed), which computes the same function.
    With ``eval_batches`` > 0 the held-out perplexity of the dense
    twin and of the one-shot pruned twin are measured on that many validation batches and
    logged (``pretrained/dense_ppl``, ``pretrained/one_shot_ppl``, at step 0), so one run
    reports dense, one-shot and, through the module's own validation, continued SLoPe.

    A resumed run pays the loading once more and then the checkpoint replaces it all.

    Args:
        source: a name of :data:`~slope_lightning.models.pretrained.PRETRAINED`
            (``"smollm2-135m"``: the module's model must be a Transformer of that preset's
            shape, e.g. ``SLoPeModule(preset="smollm2-135m")``), or a file of dense weights in
            the model's own names: ``.safetensors``, or a Lightning ``.ckpt`` of a dense run
            (its ``state_dict`` below ``<attribute>.``).
        mask_method: "wanda" (|W|·‖X‖, for pretrained weights) or "magnitude".
        calibration_batches: training batches Wanda's norms are collected over.
        eval_batches: validation batches for the before / after pruning perplexities (0: skip).
        attribute: the LightningModule attribute holding the model.
        cache_dir: where named checkpoints are cached.

    Raises:
        ValueError: a bad argument; at setup, weights that do not fit the model (the message
            names the keys or shapes), or layers of different N:M patterns.
    """

    def __init__(
        self,
        source: str = "smollm2-135m",
        mask_method: Literal["wanda", "magnitude"] = "wanda",
        calibration_batches: int = 8,
        eval_batches: int = 0,
        attribute: str = "model",
        cache_dir: str = DEFAULT_CACHE_DIR,
    ) -> None:
        if mask_method not in ("wanda", "magnitude"):
            raise ValueError(
                f"InitFromPretrained(mask_method={mask_method!r}): choose 'wanda' or 'magnitude'"
            )
        for label, value, low in (
            ("calibration_batches", calibration_batches, 1),
            ("eval_batches", eval_batches, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"InitFromPretrained({label}={value!r}): give an int >= {low}")
        if source not in PRETRAINED and not source.endswith((".safetensors", ".ckpt")):
            raise ValueError(
                f"InitFromPretrained(source={source!r}): give one of {sorted(PRETRAINED)}, a "
                ".safetensors file or a Lightning .ckpt"
            )
        self.source = source
        self.mask_method = mask_method
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.attribute = attribute
        self.cache_dir = cache_dir
        self.metrics: dict[str, float] = {}

    def _dense_state(self, model: nn.Module) -> dict[str, Tensor]:
        if self.source in PRETRAINED:
            config = getattr(model, "config", None)
            if not isinstance(config, TransformerConfig):
                raise ValueError(
                    f"InitFromPretrained(source={self.source!r}) loads into the project's "
                    f"Transformer, but {self.attribute} is a {type(model).__name__}"
                )
            pretrained, _ = load_pretrained(self.source, config.seq_len, self.cache_dir)
            if pretrained.config != config:
                raise ValueError(
                    f"InitFromPretrained(source={self.source!r}): the checkpoint is "
                    f"{pretrained.config}, the model is {config}; use "
                    f"preset={PRETRAINED[self.source].preset!r} without shape overrides"
                )
            return pretrained.state_dict()
        if self.source.endswith(".safetensors"):
            return load_file(self.source)
        checkpoint = torch.load(self.source, map_location="cpu", weights_only=True)
        prefix = f"{self.attribute}."
        return {
            key[len(prefix) :]: value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith(prefix)
        }

    def _batches(self, trainer: pl.Trainer, which: str, count: int) -> list[Any]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not is_overridden(f"{which}_dataloader", datamodule):
            raise ValueError(
                f"InitFromPretrained needs the datamodule's {which}_dataloader() for "
                f"{'calibration' if which == 'train' else 'evaluation'}; fit with a datamodule"
            )
        return list(itertools.islice(getattr(datamodule, f"{which}_dataloader")(), count))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = getattr(pl_module, self.attribute)
        layers = sparse_layers(model)
        state = _in_linear_layout(self._dense_state(model), layers)
        twin = copy.deepcopy(model)
        densify(twin)  # every SparseLinear an nn.Linear, Conv1D-made ones included
        missing, unexpected = twin.load_state_dict(state, strict=False)
        # A tied head is stored once (safetensors keeps no aliases): missing, but loaded.
        params = dict(twin.named_parameters(remove_duplicate=False))
        loaded = {id(params[key]) for key in state if key in params}
        missing = [
            key
            for key in missing
            if not key.endswith("_extra_state") and id(params.get(key)) not in loaded
        ]
        if missing or unexpected:
            raise ValueError(
                f"InitFromPretrained({self.source!r}) does not fit {self.attribute}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        twin.to(trainer.strategy.root_device)
        val = self._batches(trainer, "val", self.eval_batches) if self.eval_batches else []
        if val:
            self.metrics["pretrained/dense_ppl"] = held_out_perplexity(twin, val)
        if layers:
            patterns = {(layer.n, layer.m) for _, layer in layers}
            if len(patterns) > 1:
                raise ValueError(f"InitFromPretrained: layers of several N:M patterns {patterns}")
            (n, m) = patterns.pop()
            names = [name for name, _ in layers]
            if self.mask_method == "wanda":
                batches = self._batches(trainer, "train", self.calibration_batches)
                norms = collect_input_norms(twin, batches, layers=names)
                wanda_sparsify(twin, norms, n, m, include=names, exclude=())
            else:
                sparsify(twin, n, m, include=names, exclude=())
            if val:
                self.metrics["pretrained/one_shot_ppl"] = held_out_perplexity(twin, val)
        model.load_state_dict(twin.state_dict())  # masks, values and the dense weights
        _info(
            "InitFromPretrained: %s loaded into %s (%d layers pruned one-shot by %s)%s",
            self.source,
            self.attribute,
            len(layers),
            self.mask_method,
            "".join(f", {key} {value:.2f}" for key, value in self.metrics.items()),
        )
        if self.metrics and trainer.is_global_zero:
            for run_logger in trainer.loggers:
                run_logger.log_metrics(self.metrics, step=0)


def _in_linear_layout(
    state: Mapping[str, Tensor], layers: list[tuple[str, SparseLinear]]
) -> dict[str, Tensor]:
    """``state`` with the dense weight of every sparse layer made from a transformers Conv1D
    (stored (d_in, d_out)) transposed to (d_out, d_in), the layout of the ``nn.Linear`` that
    :func:`~slope_lightning.sparse.densify` puts in its place."""
    converted = dict(state)
    for name, layer in layers:
        key = f"{name}.weight"
        if layer.weight_layout == "conv1d" and key in converted:
            converted[key] = converted[key].t()
    return converted


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
