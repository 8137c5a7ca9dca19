"""SRSTE: train with SR-STE (Zhou et al. 2021), an N:M mask recomputed from a dense master
weight at every step, with the sparse-refined straight-through gradient.

In a config::

    trainer:
      callbacks:
        - class_path: slope_lightning.callbacks.SRSTE
          init_args: {decay: 2.0e-4}
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from typing_extensions import override

from slope_lightning.baselines.srste import (
    DEFAULT_DECAY,
    SRSTELinear,
    srste_rules,
    srste_sparsify,
)
from slope_lightning.callbacks.shared import ConvertedAtStart, check_nm_pattern
from slope_lightning.sparse import LayerRules


class SRSTE(ConvertedAtStart):
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
        check_nm_pattern("SRSTE", n, m)
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
        super().__init__(include, exclude)
        self.n = n
        self.m = m
        self.decay = float(decay)

    @override
    def rules(self) -> LayerRules:
        return srste_rules(self.n, self.m, self.include, self.exclude)

    @override
    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        return srste_sparsify(pl_module, self.n, self.m, self.decay, self.include, self.exclude)
