"""Other 2:4 training methods that SLoPe is compared with, built on ``slope_lightning.sparse``
and never imported by it.

- ``transposable``: dynamic transposable 2:4 sparsity (FST, Hu et al. 2024), the kind of
  training torchao's semi-sparse path shipped: a dense master weight re-pruned every step.
"""

from slope_lightning.baselines.transposable import (
    TransposableSparseLinear,
    transposable_mask,
    transposable_sparsify,
)

__all__ = ["TransposableSparseLinear", "transposable_mask", "transposable_sparsify"]
