"""Build the model a run trains, or trained: one :class:`Transformer`, sparsified by its
:class:`~slope_lightning.sparse.config.SparsityConfig`.

:class:`~slope_lightning.module.SLoPeModule` builds its model here, and so do the two
loaders (:func:`~slope_lightning.generate.load_checkpoint_model` from a checkpoint's
hyperparameters, :func:`~slope_lightning.export.load_exported` from an export's
``config.json``), so a model reloads with exactly the layers it was trained with.
"""

from __future__ import annotations

import dataclasses

from slope_lightning.models.config import TransformerConfig
from slope_lightning.models.transformer import Transformer
from slope_lightning.sparse import SparsifyReport, sparsify
from slope_lightning.sparse.backends.names import BackendName
from slope_lightning.sparse.config import SparsityConfig

__all__ = ["build_model"]


def build_model(
    config: TransformerConfig,
    sparsity: SparsityConfig | None = None,
    *,
    backend: BackendName | None = None,
) -> tuple[Transformer, SparsifyReport | None]:
    """A freshly initialised :class:`Transformer` of ``config``, sparsified when
    ``sparsity.sparse``.

    Args:
        config: the model's shape (e.g. :meth:`TransformerConfig.from_hparams` of a run).
        sparsity: how to sparsify it; None or ``sparse: false`` gives the dense model.
        backend: replaces ``sparsity.backend``. Loaders pass ``BackendName.reference``: it
            runs on any device, and the GEMM backend is a runtime choice, not part of the
            weights.

    Returns:
        The model (on the current default device) and the sparsify report (None for a dense
        model).

    Raises:
        NothingSparsifiedError: a sparse configuration that converts no layer (a "sparse"
            run that is dense is an error, not a silent baseline).
    """
    model = Transformer(config)
    if sparsity is None or not sparsity.sparse:
        return model, None
    if backend is not None:
        sparsity = dataclasses.replace(sparsity, backend=backend)
    report = sparsify(model, sparsity)
    report.require_converted()
    return model, report
