"""OneShotPrune: train dense, prune N:M once (magnitude or Wanda) at a chosen step, then
fine-tune with the mask fixed.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from slope_lightning.baselines.oneshot import (
    ONESHOT_METHODS,
    FixedMaskLinear,
    oneshot_prune,
    oneshot_rules,
    wanda_input_norms,
)
from slope_lightning.callbacks.shared import (
    BaselineMethod,
    check_count,
    check_fraction,
    check_nm_pattern,
    info,
    round_half_up,
)
from slope_lightning.sparse import LayerRules, MaskMethod
from slope_lightning.sparse.calibration import default_forward

logger = logging.getLogger(__name__)


class OneShotPrune(BaselineMethod):
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
        method: MaskMethod = "magnitude",
        n: int = 2,
        m: int = 4,
        calibration_batches: int = 8,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        check_fraction("OneShotPrune", "at", at, closed_above=True)
        if method not in ONESHOT_METHODS:  # a random one-shot mask is no baseline
            raise ValueError(
                f"OneShotPrune(method={method!r}): choose one of {', '.join(ONESHOT_METHODS)}"
            )
        check_nm_pattern("OneShotPrune", n, m)
        check_count("OneShotPrune", "calibration_batches", calibration_batches, "batches")
        super().__init__(include, exclude)
        self.at = float(at)
        self.method: MaskMethod = method
        self.n = n
        self.m = m
        self.calibration_batches = calibration_batches
        self.pruned = False
        self.pruned_at: int | None = None  # the optimizer step it pruned at
        self.pruned_layers: list[str] = []
        self.prune_step: int | None = None  # None: at on_train_end
        self._inputs: collections.deque[Any] = collections.deque(maxlen=calibration_batches)
        self._load_hook: RemovableHandle | None = None

    @override
    def rules(self) -> LayerRules:
        return oneshot_rules(self.n, self.m, self.include, self.exclude)

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
                exclude=self.exclude,
                n=self.n,
            )
            if trainer.world_size > 1:  # the same mask on every rank: norms over all tokens
                norms = {
                    name: trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
                    for name, norm in norms.items()
                }
        layers = oneshot_prune(
            pl_module, self.n, self.m, self.method, norms, self.include, self.exclude
        )
        if not layers:
            raise self._nothing_to_convert(pl_module)
        _zero_pruned_optimizer_state(trainer, pl_module)
        self.pruned = True
        self.pruned_at = trainer.global_step
        self.pruned_layers = layers
        self._inputs.clear()
        info(
            logger,
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
            pl_module, self.n, self.m, "magnitude", None, self.include, self.exclude
        )
        info(
            logger,
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
            info(
                logger,
                "OneShotPrune: %s already has %d FixedMaskLinear layers; not pruned again",
                type(pl_module).__name__,
                len(existing),
            )
        if not self.pruned:
            self._refuse_conflicts(trainer, pl_module)  # configure_model may have added some
            plan = self.plan(pl_module)
            if not plan.planned:
                raise self._nothing_to_convert(pl_module, plan)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:
            return
        if self.at == 0:
            self.prune_step = 0
        elif self.at < 1:
            total = self._total_steps(trainer, f"at={self.at}")
            step = round_half_up(self.at * total)
            self.prune_step = step if step < total else None
        info(
            logger,
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
        replaced = self.finalize(pl_module)
        info(
            logger,
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
