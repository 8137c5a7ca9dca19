"""Other 2:4 training methods that SLoPe is compared with, built on ``slope_lightning.sparse``
and never imported by it.

- ``transposable``: dynamic transposable 2:4 sparsity (FST, Hu et al. 2024), the kind of
  training torchao's semi-sparse path shipped: a dense master weight re-pruned every step.
- ``srste``: SR-STE (Zhou et al. 2021), the SLoPe paper's main baseline: a dense master
  weight, an N:M magnitude mask recomputed every step, and the sparse-refined
  straight-through gradient.
- ``oneshot``: prune a trained dense model once (magnitude or Wanda), then fine-tune it with
  the mask fixed.
"""

from slope_lightning.baselines.oneshot import (
    FixedMaskLinear,
    oneshot_finalize,
    oneshot_prune,
    wanda_input_norms,
)
from slope_lightning.baselines.srste import (
    SRSTELinear,
    srste_finalize,
    srste_mask,
    srste_sparsify,
)
from slope_lightning.baselines.transposable import (
    TRANSPOSABLE_BACKENDS,
    TransposableSparseLinear,
    transposable_finalize,
    transposable_mask,
    transposable_sparsify,
)

# The one Wanda score of the library, re-exported for the one-shot baseline's users.
from slope_lightning.sparse.calibration import wanda_scores

__all__ = [
    "TRANSPOSABLE_BACKENDS",
    "FixedMaskLinear",
    "SRSTELinear",
    "TransposableSparseLinear",
    "oneshot_finalize",
    "oneshot_prune",
    "srste_finalize",
    "srste_mask",
    "srste_sparsify",
    "transposable_finalize",
    "transposable_mask",
    "transposable_sparsify",
    "wanda_input_norms",
    "wanda_scores",
]
