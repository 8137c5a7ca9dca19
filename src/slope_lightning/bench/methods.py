"""The training methods the benchmarks compare, built the same way for every suite.

``method_model(preset, method)`` gives a seeded :class:`Transformer` for one of :data:`METHODS`,
so that every benchmark measures the same weights and the same layer selection.
"""

from __future__ import annotations

from typing import Any

import torch

from slope_lightning.baselines import transposable_sparsify
from slope_lightning.models import Transformer, TransformerConfig
from slope_lightning.sparse import sparsify

#: ``dense``: the unmodified model (every nn.Linear dense), the baseline for all speedups.
#: ``slope``: SLoPe: a static 2:4 row mask, the double-pruned sparse backward and sparse
#: weight gradients (:func:`slope_lightning.sparse.sparsify`).
#: ``transposable``: the dynamic transposable 2:4 baseline (FST, Hu et al. 2024; the kind of
#: training torchao's semi-sparse path shipped): a dense master weight re-pruned after every
#: optimizer step with a mask that is 2:4 along both dimensions, so that the forward and the
#: input gradient use the same sparse weight while the weight gradient stays dense
#: (:func:`slope_lightning.baselines.transposable_sparsify`).
METHODS: tuple[str, ...] = ("dense", "slope", "transposable")


def method_model(
    preset: str,
    method: str,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[Transformer, TransformerConfig]:
    """A seeded transformer for ``method``, moved to ``device`` and cast to ``dtype``.

    Args:
        preset: a :meth:`TransformerConfig.from_name` preset.
        method: one of :data:`METHODS`.
        backend: SparseLinear backend for ``slope`` (ignored by the other methods).
        dtype: parameter dtype of the returned model.
        device: where the returned model lives; ``transposable`` uses its CUDA kernels
            (``backend="auto"``) on a CUDA device and the dense masked reference elsewhere.
        overrides: TransformerConfig fields to change (e.g. ``n_layer=2``).

    Returns:
        ``(model, config)``; the model's weights depend only on ``preset``, ``overrides`` and
        the device's random generator (seed 0), not on ``method``.

    Raises:
        ValueError: unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    torch.manual_seed(0)
    config = TransformerConfig.from_name(preset, **overrides)
    with torch.device(device):  # built and pruned on the device: on a CPU this takes minutes
        model = Transformer(config)
        if method == "slope":
            sparsify(model, backend=backend)
        elif method == "transposable":
            on_cuda = torch.device(device).type == "cuda"
            transposable_sparsify(model, backend="auto" if on_cuda else "reference")
    return model.to(device=device, dtype=dtype), config
