"""The training methods the benchmarks compare, built the same way for every suite.

``method_model(preset, method)`` gives a seeded :class:`Transformer` for one of :data:`METHODS`,
so that every benchmark measures the same weights and the same layer selection. A
``precision`` trains the way the configs do (Lightning's names: ``bf16-mixed`` keeps fp32
master values and runs the forward under bf16 autocast), and :data:`BENCH_PRESETS` adds
shapes the model presets lack (the widths of LLaMA-3-8B, where 2:4 GEMMs start to pay).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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

#: Lightning precision name -> (parameter dtype, autocast dtype or None), as the Trainer
#: runs it: ``bf16-mixed`` keeps fp32 parameters (and so fp32 AdamW state) and computes the
#: forward under bf16 autocast, like ``configs/gpt2-small.yaml``.
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "32-true": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16-true": (torch.bfloat16, None),
    "16-true": (torch.float16, None),
}

#: Benchmark-only shapes: name -> (model preset, TransformerConfig overrides).
#: ``llama-8b-4l``: LLaMA-3-8B's widths (d_model 4096, MLP 14336, 32 heads, 8 KV heads) in
#: 4 layers, with llama-1b's 32000-token vocabulary: ~1.0B parameters, of which 0.87B in
#: sparse blocks; fits an 80 GB GPU in fp32 with AdamW. ``micro``: a 1-layer model of width
#: 64 for the CPU dry run of ``scripts/gpu_check.sh``.
BENCH_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-8b-4l": (
        "llama-1b",
        {"d_model": 4096, "mlp_hidden": 14336, "n_layer": 4, "n_head": 32, "n_kv_head": 8},
    ),
    "micro": (
        "tiny",
        {"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1, "seq_len": 64},
    ),
}


def bench_config(preset: str, **overrides: Any) -> TransformerConfig:
    """The config of a model preset or a :data:`BENCH_PRESETS` name, with ``overrides``."""
    if preset in BENCH_PRESETS:
        base, fields = BENCH_PRESETS[preset]
        return TransformerConfig.from_name(base, **{**fields, **overrides})
    return TransformerConfig.from_name(preset, **overrides)


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) of a :data:`PRECISIONS` name."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


class AutocastTransformer(Transformer):
    """A :class:`Transformer` whose forward runs under autocast, as Lightning's mixed
    precision runs it: parameters, gradients and optimizer state stay in their own dtype,
    the backward runs outside the autocast region, as the PyTorch docs recommend."""

    def __init__(self, config: TransformerConfig, autocast_dtype: torch.dtype) -> None:
        super().__init__(config)
        self.autocast_dtype = autocast_dtype

    def forward(self, idx: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        with torch.autocast(idx.device.type, dtype=self.autocast_dtype):
            return super().forward(idx, *args, **kwargs)


def method_model(
    preset: str,
    method: str,
    backend: str = "reference",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    **overrides: Any,
) -> tuple[Transformer, TransformerConfig]:
    """A seeded transformer for ``method``, moved to ``device`` and cast to ``dtype``.

    Args:
        preset: a :meth:`TransformerConfig.from_name` preset or a :data:`BENCH_PRESETS` name.
        method: one of :data:`METHODS`.
        backend: SparseLinear backend for ``slope`` (ignored by the other methods).
        dtype: parameter dtype of the returned model (when ``precision`` is None).
        device: where the returned model lives; ``transposable`` uses its CUDA kernels
            (``backend="auto"``) on a CUDA device and the dense masked reference elsewhere.
        precision: a :data:`PRECISIONS` name; it sets the parameter dtype (``dtype`` is then
            ignored) and, for ``bf16-mixed``, returns an :class:`AutocastTransformer`.
        overrides: TransformerConfig fields to change (e.g. ``n_layer=2``).

    Returns:
        ``(model, config)``; the model's weights depend only on ``preset``, ``overrides`` and
        the device's random generator (seed 0), not on ``method``.

    Raises:
        ValueError: unknown method or precision.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    autocast_dtype = None
    if precision is not None:
        dtype, autocast_dtype = precision_dtypes(precision)
    torch.manual_seed(0)
    config = bench_config(preset, **overrides)
    with torch.device(device):  # built and pruned on the device: on a CPU this takes minutes
        model = (
            Transformer(config)
            if autocast_dtype is None
            else AutocastTransformer(config, autocast_dtype)
        )
        if method == "slope":
            sparsify(model, backend=backend)
        elif method == "transposable":
            on_cuda = torch.device(device).type == "cuda"
            transposable_sparsify(model, backend="auto" if on_cuda else "reference")
    return model.to(device=device, dtype=dtype), config
