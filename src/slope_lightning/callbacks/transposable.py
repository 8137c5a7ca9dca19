"""TransposableSparse: dynamic transposable 2:4 (FST, Hu et al. 2024), optionally ending with
a dense fine-tuning tail.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from slope_lightning.baselines.transposable import (
    TransposableSparseLinear,
    transposable_backend,
    transposable_rules,
    transposable_sparsify,
)
from slope_lightning.callbacks.shared import (
    ConvertedAtStart,
    check_fraction,
    info,
    round_half_up,
)
from slope_lightning.sparse import LayerRules
from slope_lightning.sparse.selection import replace_children

logger = logging.getLogger(__name__)


class TransposableSparse(ConvertedAtStart):
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
        backend: str = "auto",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        check_fraction("TransposableSparse", "dense_tail", dense_tail, closed_above=False)
        super().__init__(include, exclude)
        self.dense_tail = float(dense_tail)
        self.backend = transposable_backend(backend, f"TransposableSparse(backend={backend!r}): ")
        self.dense_from: int | None = None  # the optimizer step the dense tail starts at
        self.densified_at: int | None = None

    @override
    def rules(self) -> LayerRules:
        return transposable_rules(self.include, self.exclude)

    @override
    def _convert(self, pl_module: pl.LightningModule) -> list[str]:
        return transposable_sparsify(pl_module, self.include, self.exclude, self.backend)

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
        tail = round_half_up(self.dense_tail * total)
        if tail == 0:
            info(
                logger,
                "TransposableSparse: dense_tail=%g of %d steps rounds to no step; sparse to "
                "the end",
                self.dense_tail,
                total,
            )
            return
        self.dense_from = total - tail
        info(
            logger,
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
            info(
                logger,
                "TransposableSparse: at optimizer step %d, %d layers are dense nn.Linear layers "
                "again (their unmasked master weights) for the dense tail",
                trainer.global_step,
                len(densified),
            )


def _densify(model: nn.Module) -> list[str]:
    """Replace every TransposableSparseLinear of ``model`` by an nn.Linear holding its master
    weight and bias, unmasked and shared (the optimizer keeps them); returns their names."""

    def unmasked(layer: nn.Module) -> nn.Module:
        assert isinstance(layer, TransposableSparseLinear)
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",  # placeholders, replaced by the layer's Parameters below
            dtype=layer.weight.dtype,
        )
        linear.weight = layer.weight
        linear.bias = layer.bias  # type: ignore[assignment]
        linear.train(layer.training)
        return linear

    return replace_children(model, TransposableSparseLinear, unmasked)
